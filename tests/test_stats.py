"""flexlora.stats: the bootstrap interval covers a known mean at about its nominal rate, clustering
by client matters, paired differences are paired, and everything is seeded."""

import numpy as np
import pytest

from flexlora.stats import cluster_bootstrap, figure_units, format_interval, paired_differences, record_intervals, t_quantile

REPS = 300  # coverage replications: a 95% interval then hits 285 +- 11 (3 binomial sd: 0.91-0.99)


def _clustered(rng, clients, per_client, mean=10.0):
    """Scores with a client (task) effect as large as the example noise: examples of a client are correlated."""
    effect = rng.normal(0.0, 3.0, clients)
    return mean + effect[:, None] + rng.normal(0.0, 3.0, (clients, per_client))


def test_t_quantile_matches_tables():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.975, 7) == pytest.approx(2.3646, abs=1e-3)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-3)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.9600, abs=1e-3)


def test_interval_covers_a_known_mean_at_about_its_nominal_rate():
    rng = np.random.default_rng(0)
    hits = naive_hits = 0
    for rep in range(REPS):
        scores = _clustered(rng, clients=10, per_client=4)
        weights = rng.integers(10, 200, 10)  # data-size weights, independent of the scores: the mean stays 10
        boot = cluster_bootstrap([scores.mean(axis=1)], weights, resamples=1000, seed=rep)
        low, high = boot.intervals[0]
        hits += low <= 10.0 <= high
        naive = cluster_bootstrap([scores.ravel()], np.repeat(weights, 4), resamples=1000, seed=rep)  # examples as if independent
        naive_hits += naive.intervals[0][0] <= 10.0 <= naive.intervals[0][1]
    assert 0.91 <= hits / REPS <= 0.99, hits / REPS
    assert naive_hits / REPS < 0.85, naive_hits / REPS  # ignoring the clusters would overstate certainty


def test_paired_difference_covers_the_true_difference_and_is_narrower_than_separate_intervals():
    rng = np.random.default_rng(1)
    hits, paired_width, separate_width = 0, [], []
    for rep in range(REPS):
        first = _clustered(rng, clients=12, per_client=1).ravel()
        second = first + 1.5 + rng.normal(0.0, 1.0, 12)  # the same examples, scored 1.5 higher on average
        boot = cluster_bootstrap([first, second], resamples=1000, seed=rep)
        low, high = boot.difference_intervals[1]
        hits += low <= 1.5 <= high
        paired_width.append(high - low)
        separate_width.append(np.diff(boot.intervals, axis=1).sum())
    assert 0.91 <= hits / REPS <= 0.99, hits / REPS
    assert np.median(paired_width) < 0.5 * np.median(separate_width)
    assert tuple(boot.difference_intervals[0]) == (0.0, 0.0)


def test_seeded_and_deterministic():
    values = np.random.default_rng(2).normal(size=(2, 9))
    a, b = cluster_bootstrap(values, seed=3), cluster_bootstrap(values, seed=3)
    assert a.intervals.tobytes() == b.intervals.tobytes() and a.difference_intervals.tobytes() == b.difference_intervals.tobytes()
    assert cluster_bootstrap(values, seed=4).intervals.tobytes() != a.intervals.tobytes()
    assert cluster_bootstrap([[5.0]]).intervals is None  # one unit: no interval rather than a zero-width one
    with pytest.raises(ValueError, match="weights"):
        cluster_bootstrap(values, [1.0, 2.0])


def _record(rows, weighted, loss=None):
    return {"rouge_l_weighted": weighted, "rouge_l_mean": weighted, "proxy_eval_loss": loss, "per_client": rows}


def _row(cid, scores, weight, digest="d", loss=None):
    row = {"client_id": cid, "n_examples": len(scores), "rouge_l": float(np.mean(scores)) if scores else None, "weight": weight,
           "example_rouge_l": list(scores), "examples_digest": digest}
    if loss is not None:
        row["example_loss_sum"], row["example_tokens"] = loss
        row["proxy_eval_loss"] = sum(loss[0]) / sum(loss[1])
    return row


def test_record_units_reproduce_the_figure_and_pair_only_on_the_same_examples():
    rows = [_row(1, [100, 0], 10), _row(2, [100], 30), _row(3, [0, 100, 100], 60), _row(4, [], 100)]
    ids, values, weights = figure_units(_record(rows, 75.0), "rouge_l_weighted")
    assert len(ids) == 3 and np.average(values, weights=weights) == pytest.approx(75.0)  # as evaluate_clients computes it
    iv = record_intervals(_record(rows, 75.0))
    assert iv["rouge_l_weighted"][0] <= 75.0 <= iv["rouge_l_weighted"][1] and iv["interval"]["unit"] == "client"
    assert "proxy_eval_loss" not in iv  # the record has no eval loss
    better = [_row(1, [100, 20], 10), _row(2, [100], 30), _row(3, [20, 100, 100], 60), _row(4, [], 100)]  # 80
    (diff,) = paired_differences([_record(rows, 75.0), _record(better, 80.0)])
    assert diff["rouge_l_weighted"]["difference"] == pytest.approx(80.0 - 75.0)
    assert 0 <= diff["rouge_l_weighted"]["low"] <= 5.0 <= diff["rouge_l_weighted"]["high"]  # never worse on any client
    other_examples = [_row(1, [100, 20], 10, digest="other"), *better[1:]]
    assert paired_differences([_record(rows, 75.0), _record(other_examples, 80.0)])[0]["rouge_l_weighted"] is None
    # one client: its examples are the units; the loss is the client's token mean
    single = _record([_row(7, [10, 20, 90], 5, loss=([4.0, 6.0, 2.0], [2, 3, 1]))], 40.0, loss=2.0)
    iv = record_intervals(single)
    assert iv["interval"]["unit"] == "example" and iv["interval"]["units"] == 3
    ids, values, weights = figure_units(single, "proxy_eval_loss")
    assert np.average(values, weights=weights) == pytest.approx(2.0)


def test_format_interval():
    assert format_interval(21.875, [15.3125, 28.4375]) == "21.88 [15.31, 28.44]"
    assert format_interval(3.1, [-2.0, 8.25], signed=True) == "+3.10 [-2.00, +8.25]"
    assert format_interval(None, None) == "-" and format_interval(2.5, None, 3) == "2.500"
