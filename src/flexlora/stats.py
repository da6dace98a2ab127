"""How sure a held-out figure is: bootstrap 95% intervals and paired differences (numpy only).

A held-out figure such as Rouge-L is a weighted mean over clients of each client's mean over its
examples. Examples of one client share a task, so they are not independent draws: the bootstrap
resamples whole clients (clusters) with replacement and recomputes the figure, which keeps the
within-task correlation in the resamples. With one example per client that is the ordinary
bootstrap over examples; with a single client its examples are resampled (the interval then speaks
about that one task only).

The interval is the *expanded percentile* bootstrap (Hesterberg, "What teachers should know about
the bootstrap", 2015): plain percentile intervals are too narrow for few clusters (they behave like
a z interval with the biased variance), so the percentile levels are widened to
``Phi(-sqrt(n / (n - 1)) * t_{n-1, 1 - alpha/2})``; for a mean this matches a t interval's
coverage, and for large n it is the plain percentile interval.

A paired difference resamples the *same* clients for both figures (both models scored on the same
examples), so what the clients share (task difficulty) cancels and the interval is much narrower
than two separate intervals suggest. Everything is seeded: the same scores give the same bytes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "FIGURES",
    "Bootstrap",
    "cluster_bootstrap",
    "figure_units",
    "format_interval",
    "paired_differences",
    "record_intervals",
    "t_quantile",
]

LEVEL = 0.95
RESAMPLES = 4000
SEED = 0
_CHUNK = 500  # resamples drawn at a time: memory stays O(500 x clusters)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for 0.5 <= p < 1 (Simpson integration of the density + bisection)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        dens = norm * (1 + grid**2 / df) ** (-(df + 1) / 2)
        h = x / 4000
        return 0.5 + h / 3 * (dens[0] + dens[-1] + 4 * dens[1:-1:2].sum() + 2 * dens[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@functools.lru_cache(maxsize=256)
def _expanded_levels(n: int, level: float) -> tuple[float, float]:
    """The lower and upper percentile levels of the expanded percentile interval for n clusters."""
    if n < 2:
        return 0.0, 1.0
    z = math.sqrt(n / (n - 1)) * t_quantile(1 - (1 - level) / 2, n - 1)
    tail = 0.5 * math.erfc(z / math.sqrt(2))
    return tail, 1 - tail


@dataclass(frozen=True)
class Bootstrap:
    """Weighted means of m figures over the same n clusters, their intervals, and each figure's
    difference to figure 0 with its (paired) interval; intervals are None with fewer than 2 clusters."""

    estimates: np.ndarray  # (m,)
    intervals: np.ndarray | None  # (m, 2)
    differences: np.ndarray  # (m,): estimate_j - estimate_0
    difference_intervals: np.ndarray | None  # (m, 2); row 0 is [0, 0]
    clusters: int
    level: float
    resamples: int


def _weighted_means(values: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(resamples, m): each resample's weighted mean; a resample of zero-weight clusters only
    takes the plain mean, as the figure itself does when every weight is zero."""
    cw = counts * weights  # (b, n)
    total = cw.sum(axis=1, keepdims=True)
    weighted = cw @ values.T / np.where(total > 0, total, 1.0)
    plain = counts @ values.T / counts.sum(axis=1, keepdims=True)
    return np.where(total > 0, weighted, plain)


def cluster_bootstrap(
    values: Sequence[Sequence[float]] | np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Bootstrap:
    """``values[j][k]``: figure j's value on cluster k (every figure on the same clusters);
    ``weights[k]``: cluster k's weight in every figure (None: equal). All-zero weights mean equal."""
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    m, n = v.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or n == 0:
        raise ValueError(f"cluster_bootstrap: {n} clusters need {n} weights, got shape {w.shape}")
    if not (np.isfinite(v).all() and np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("cluster_bootstrap: values must be finite and weights finite and >= 0")
    if w.sum() == 0:
        w = np.ones(n)
    estimates = _weighted_means(v, w, np.ones((1, n)))[0]
    if n < 2:
        return Bootstrap(estimates, None, estimates - estimates[0], None, n, level, 0)
    rng = np.random.default_rng(seed)
    stats = np.concatenate([
        _weighted_means(v, w, rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, resamples - start)).astype(np.float64))
        for start in range(0, resamples, _CHUNK)
    ])  # (resamples, m)
    lo, hi = _expanded_levels(n, level)
    intervals = np.quantile(stats, [lo, hi], axis=0).T
    diffs = stats - stats[:, :1]
    difference_intervals = np.quantile(diffs, [lo, hi], axis=0).T
    return Bootstrap(estimates, intervals, estimates - estimates[0], difference_intervals, n, level, resamples)


# --------------------------------------------------------------- the figures of an evaluation record

FIGURES = ("rouge_l_weighted", "rouge_l_mean", "proxy_eval_loss")
_CLIENT_VALUE = {"rouge_l_weighted": "rouge_l", "rouge_l_mean": "rouge_l", "proxy_eval_loss": "proxy_eval_loss"}


def figure_units(record: Mapping[str, Any], figure: str) -> tuple[list[Any], list[float], list[float]] | None:
    """(unit ids, values, weights) whose weighted mean is ``record[figure]`` (an
    :class:`flexlora.evaluate.EvalResult` as a dict): one unit per client that has a score, or, with
    a single such client, one per example (when the record keeps them). None: nothing to resample."""
    key = _CLIENT_VALUE[figure]
    rows = [r for r in record.get("per_client", []) if r.get(key) is not None]
    if not rows:
        return None
    if len(rows) == 1:
        row = rows[0]
        if figure == "proxy_eval_loss":
            sums, tokens = row.get("example_loss_sum"), row.get("example_tokens")
            if not sums:
                return None
            kept = [(i, s / t, t) for i, (s, t) in enumerate(zip(sums, tokens)) if t > 0]  # the client's token mean
            return [(row["client_id"], row.get("examples_digest"), i) for i, _, _ in kept], [x for _, x, _ in kept], [float(t) for _, _, t in kept]
        scores = row.get("example_rouge_l")
        if not scores:
            return None
        return [(row["client_id"], row.get("examples_digest"), i) for i in range(len(scores))], list(scores), [1.0] * len(scores)
    weights = [1.0 if figure == "rouge_l_mean" else float(r["weight"]) for r in rows]
    return [(r["client_id"], r["n_examples"], r.get("examples_digest")) for r in rows], [float(r[key]) for r in rows], weights


def record_intervals(record: Mapping[str, Any], level: float = LEVEL, seed: int = SEED) -> dict[str, Any]:
    """``{figure: [low, high] or None}`` for every figure the record has, plus ``"interval"``: how
    they were made (level, the resampled unit and how many, resamples, seed, method)."""
    out: dict[str, Any] = {}
    units_seen = 0
    for figure in FIGURES:
        units = None if record.get(figure) is None else figure_units(record, figure)
        if units is None:
            continue
        ids, values, weights = units
        boot = cluster_bootstrap([values], weights, level=level, seed=seed)
        out[figure] = None if boot.intervals is None else [float(x) for x in boot.intervals[0]]
        units_seen = units_seen or len(ids)
    scored = sum(1 for r in record.get("per_client", []) if r.get("rouge_l") is not None)
    out["interval"] = {
        "level": level, "unit": "example" if scored == 1 else "client", "units": units_seen,
        "resamples": RESAMPLES, "seed": seed, "method": "expanded percentile cluster bootstrap (flexlora.stats)",
    }
    return out


def paired_differences(records: Sequence[Mapping[str, Any]], level: float = LEVEL, seed: int = SEED) -> list[dict[str, Any]]:
    """For each record after the first: ``{figure: {"difference", "low", "high"} or None}`` against
    ``records[0]``, resampling the same units for both; None where they were not scored on the same
    clients and examples (a paired difference would then mean nothing)."""
    out: list[dict[str, Any]] = [{} for _ in records[1:]]
    for figure in FIGURES:
        first = None if records[0].get(figure) is None else figure_units(records[0], figure)
        for j, record in enumerate(records[1:]):
            other = None if record.get(figure) is None else figure_units(record, figure)
            if first is None or other is None:
                continue
            if first[0] != other[0] or first[2] != other[2]:
                out[j][figure] = None
                continue
            boot = cluster_bootstrap([first[1], other[1]], first[2], level=level, seed=seed)
            if boot.difference_intervals is None:
                out[j][figure] = None
                continue
            low, high = boot.difference_intervals[1]
            out[j][figure] = {"difference": float(boot.differences[1]), "low": float(low), "high": float(high)}
    return out


def format_interval(value: float | None, interval: Sequence[float] | None, digits: int = 2, signed: bool = False) -> str:
    """``21.88 [15.31, 28.44]``; ``-`` without a value; the value alone without an interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    sign = "+" if signed else ""
    text = f"{value:{sign}.{digits}f}"
    return text if interval is None else f"{text} [{interval[0]:{sign}.{digits}f}, {interval[1]:{sign}.{digits}f}]"


def summary_intervals(last: Mapping[str, Any] | None, first: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A run summary's intervals: the last evaluation's figures, and ``base_rouge_l_weighted`` from
    the round-0 evaluation (None without an evaluation)."""
    if last is None:
        return None
    out = record_intervals(last)
    if first is not None:
        out["base_rouge_l_weighted"] = record_intervals(first).get("rouge_l_weighted")
    return out
