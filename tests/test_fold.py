"""Updates folded as they arrive (flexlora.fold, AggregationMethod.accumulator) against today's path:
every update held, screened with screen_updates, aggregated with aggregate, diagnosed from the updates.

Bit-identical where the arithmetic is the same: FlexLoRA and FLoRIST while the stacked rank keeps the
factored path (the same stack, the same coefficients), the screen's verdicts (the same norms, the same
rule), HetLoRA's recorded weights. To rounding elsewhere: a dense sum adds the clients' products one
by one instead of one product of the stack, and FedAvg / FFA / HetLoRA / rank-partition sums take
unnormalised weights (the total is known only at the end) where ``aggregate`` multiplies by normalised
ones; in float64 that is ~1e-15 relative (asserted at 1e-12), in float32 ~1e-7 (asserted at 1e-5).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.diagnostics import aggregation_report
from flexlora.fold import DiskStash, RoundFold
from flexlora.lowrank import LowRankSum, choose_path, stack_factors
from flexlora.methods import METHODS, get_method
from flexlora.methods.base import HeldUpdates
from flexlora.methods.fedavg import FedAvg
from flexlora.update import ClientUpdate, LoraFactors, ServerState
from flexlora.validate import ValidationConfig, screen_updates
from strategies import federations

FOLDING = [
    ("flexlora", {}),
    ("flexlora", {"svd_path": "dense"}),
    ("flexlora", {"keep_rank": 3, "singular_values": "sqrt"}),
    ("hetlora", {}),
    ("hetlora", {"weighting": "norm_x_data"}),
    ("hetlora", {"weighting": "data"}),
    ("rank_partition", {}),
    ("rank_partition", {"redistribute": "svd"}),
    ("florist", {"threshold": 0.8}),
]
SAME_RANK = [("fedavg", {}), ("ffa", {})]


def fixed_updates(k: int, same_rank: bool = False, seed: int = 0) -> tuple[list[ClientUpdate], dict[str, tuple[int, int]]]:
    """k float64 updates at two small modules (ranks 2-4, or 3 for all)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.q_proj": (9, 7), "layers.0.down_proj": (6, 11)}
    updates = []
    for i in range(k):
        r = 3 if same_rank else 2 + i % 3
        updates.append(ClientUpdate(f"c{i}", 5 + 7 * i, {n: LoraFactors(A=torch.randn(r, d_in, generator=g, dtype=torch.float64), B=torch.randn(d_out, r, generator=g, dtype=torch.float64), scale=16 / r)
                                                       for n, (d_out, d_in) in shapes.items()}))
    return updates, shapes


def total_delta(state: ServerState, name: str) -> torch.Tensor:
    d = state.adapter[name].delta()
    if state.base_delta is not None:
        d = d + state.base_delta[name].delta()
    return d


def assert_same_state(got: ServerState, want: ServerState, rtol: float | None) -> None:
    """rtol None: the same bits; else the same global update (and factors) to ``rtol`` of its norm."""
    assert got.weights == want.weights and got.round == want.round
    assert {k: v for k, v in got.info.items() if k != "module_weights"} == {k: v for k, v in want.info.items() if k != "module_weights"}
    for name in want.adapter:
        if rtol is None:
            for part in ("A", "B", "spectrum"):
                a, b = getattr(got.adapter[name], part), getattr(want.adapter[name], part)
                assert (a is None and b is None) or torch.equal(a, b), (name, part)
            if want.base_delta is not None:
                assert torch.equal(got.base_delta[name].B, want.base_delta[name].B) and torch.equal(got.base_delta[name].A, want.base_delta[name].A)
        else:
            w = total_delta(want, name)
            assert float((total_delta(got, name) - w).norm()) <= rtol * max(float(w.norm()), 1e-300), name


def folded(method, updates) -> ServerState:
    acc = method.accumulator()
    for u in updates:
        acc.add(u)
    return acc.finish(round=3)


def factored(updates, shapes) -> bool:
    return all(choose_path(*shapes[n], sum(u.modules[n].rank for u in updates)) == "factored" for n in shapes)


@settings(max_examples=25, deadline=None)
@given(fed=federations(max_clients=6, max_dim=16, max_rank=6), which=st.integers(0, len(FOLDING) - 1))
def test_a_folded_round_equals_the_held_one(fed, which):
    updates, shapes = fed
    name, options = FOLDING[which]
    method = get_method(name, dtype=torch.float64, **options)
    assert method.folds_updates
    want = method.aggregate(updates, round=3)
    got = folded(method, updates)
    same_bits = name in ("flexlora", "florist") and options.get("svd_path") != "dense" and factored(updates, shapes)
    assert_same_state(got, want, None if same_bits else 1e-12)
    if name == "hetlora":  # the recorded per-module weights are computed from the same norms
        assert got.info["module_weights"] == want.info["module_weights"]
    if name == "flexlora" and "keep_rank" not in options:  # and both are the exact weighted sum (dense reference)
        n = sum(u.num_examples for u in updates)
        for m in shapes:
            exact = sum(u.num_examples / n * u.modules[m].delta() for u in updates)
            assert torch.allclose(total_delta(got, m), exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))


@settings(max_examples=10, deadline=None)
@given(fed=federations(max_clients=5, max_dim=12, max_rank=4, shared_A=True), which=st.integers(0, 1))
def test_fedavg_and_ffa_folds_equal_aggregate(fed, which):
    updates, _ = fed
    name, options = SAME_RANK[which]
    method = get_method(name, dtype=torch.float64, **options)
    assert_same_state(folded(method, updates), method.aggregate(updates, round=3), 1e-12)


def test_float32_folds_agree_to_rounding_and_the_dense_path_is_taken():
    g = torch.Generator().manual_seed(1)
    shapes = {"q": (48, 40), "down": (40, 64)}
    updates = [ClientUpdate(f"c{i}", 10 + i, {n: LoraFactors(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g) * 0.01, scale=16 / r)
                                           for n, (d_out, d_in) in shapes.items()}) for i, r in enumerate([8, 16, 24, 32, 8, 16])]
    method = get_method("flexlora")
    got = folded(method, updates)
    assert set(got.info["svd_paths"].values()) == {"dense"}
    assert_same_state(got, method.aggregate(updates, round=3), 1e-5)


def test_a_refusal_is_raised_by_the_fold_as_by_aggregate():
    updates, _ = fixed_updates(1)
    bad = ClientUpdate("x", 5, {n: LoraFactors(A=f.A[:1].clone(), B=f.B[:, :1].clone(), scale=f.scale) for n, f in updates[0].modules.items()})
    padded = ClientUpdate("y", 5, {n: LoraFactors(A=torch.cat([f.A, f.A[:1]]), B=torch.cat([f.B, f.B[:, :1]], dim=1), scale=f.scale) for n, f in updates[0].modules.items()})
    method = get_method("fedavg", dtype=torch.float64)
    with pytest.raises(ValueError, match="same rank"):
        method.aggregate([bad, padded])
    with pytest.raises(ValueError, match="same rank"):
        folded(method, [bad, padded])


def test_methods_that_cannot_fold_hold_and_a_subclass_never_inherits_a_fold():
    assert not get_method("flora").folds_updates and not get_method("fedex").folds_updates  # their stacks are the release
    assert {n for n in METHODS if get_method(n).folds_updates} >= {"flexlora", "fedavg", "hetlora", "ffa", "rank_partition", "florist"}

    class Corrected(FedAvg):  # changes aggregate, not the fold: must not be folded by FedAvg's rule
        name = "corrected"

        def aggregate(self, updates, weights=None, round=0):
            state = super().aggregate(updates, weights, round)
            state.info["corrected"] = True
            return state

    method = Corrected(dtype=torch.float64)
    assert isinstance(method.accumulator(), HeldUpdates) and not method.folds_updates
    updates, _ = fixed_updates(3, same_rank=True)
    assert folded(method, updates).info["corrected"] is True


def test_low_rank_sum_switches_to_dense_once_and_keeps_the_value():
    g = torch.Generator().manual_seed(0)
    terms = [(torch.randn(30, r, generator=g, dtype=torch.float64), torch.randn(r, 20, generator=g, dtype=torch.float64), float(w), 0.5 + r) for r, w in [(3, 2), (4, 5), (9, 1), (12, 7)]]
    s = LowRankSum(30, 20, torch.float64)
    ranks = 0
    for B, A, w, sc in terms:
        s.add(B, A, w, sc)
        ranks += A.shape[0]
        assert (s.dense is None) == (choose_path(30, 20, ranks) == "factored")
        assert s.dense is None or not s.terms  # the factors are let go once dense
    W = sum(t[2] for t in terms)
    exact = sum((w / W) * sc * (B @ A) for B, A, w, sc in terms)
    assert torch.allclose(s.mean(), exact, rtol=1e-12, atol=1e-12)
    small = LowRankSum(30, 20, torch.float64)
    small.add(*terms[0])
    Bcat, Acat = small.stack()
    want = stack_factors([terms[0][0]], [terms[0][1]], [(terms[0][2] / terms[0][2]) * terms[0][3]], torch.float64)
    assert torch.equal(Bcat, want[0]) and torch.equal(Acat, want[1])


def _with_norms(updates: list[ClientUpdate], factors: list[float]) -> list[ClientUpdate]:
    return [ClientUpdate(u.client_id, u.num_examples, {n: LoraFactors(A=f.A, B=f.B * k, scale=f.scale) for n, f in u.modules.items()}) for u, k in zip(updates, factors)]


@settings(max_examples=25, deadline=None)
@given(
    fed=federations(max_clients=8, max_dim=10, max_rank=4),
    outliers=st.lists(st.sampled_from([1.0, 1.0, 1.0, 0.0, 1e-4, 1e3, 1e6]), min_size=8, max_size=8),
    missing=st.lists(st.booleans(), min_size=8, max_size=8),
    seed=st.integers(0, 100),
    name=st.sampled_from(["flexlora", "hetlora"]),
)
def test_the_screen_drops_the_same_updates_and_the_state_is_todays(fed, outliers, missing, seed, name):
    """Whatever the norms, the order of arrival and the clients that never reply: the same verdicts as
    screen_updates, nothing folded that the screen rejects, and the state of the accepted updates."""
    updates, shapes = fed
    updates = _with_norms(updates, outliers)
    order = list(range(len(updates)))
    random.Random(seed).shuffle(order)
    arriving = [updates[i] for i in order if not missing[i]]
    config = ValidationConfig(norm_factor=100.0)
    method = get_method(name, dtype=torch.float64)
    fold = RoundFold(method, shapes, config, [u.client_id for u in updates], stash=DiskStash())
    for i in order:
        if missing[i]:
            fold.absent(updates[i].client_id)
        else:
            fold.add(updates[i])
    accepted_ids, rejected = fold.settle()
    want_accepted, want_rejected = screen_updates(arriving, shapes, None, config)
    assert accepted_ids == [u.client_id for u in want_accepted] and rejected == want_rejected
    assert not set(fold.folded) & set(rejected)
    if want_accepted:
        got, want = fold.aggregate(3), method.aggregate(want_accepted, round=3)
        same_order = fold.folded == accepted_ids
        exact_bits = name == "flexlora" and same_order and factored(want_accepted, shapes)
        assert_same_state(got, want, None if exact_bits else 1e-10)
        report = fold.report(got)
        want_report = aggregation_report(want, want_accepted, [want.weights[u.client_id] for u in want_accepted], exact=method.exact_aggregate)
        for m in shapes:
            a, b = report[m]["rel_error_vs_exact"], want_report[m]["rel_error_vs_exact"]
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (m, a, b)


def test_an_ordinary_round_holds_only_until_half_has_come_and_nothing_without_a_screen():
    updates, shapes = fixed_updates(1)
    many = [ClientUpdate(f"c{i}", 5, updates[0].modules) for i in range(10)]
    for factor, most_held in ((100.0, 4), (None, 0)):
        fold = RoundFold(get_method("flexlora"), shapes, ValidationConfig(norm_factor=factor), [u.client_id for u in many])
        held = []
        for u in many:
            fold.add(u)
            held.append(len(fold.held))
        assert max(held) == most_held and held[-1] == 0  # the bound admits every update once half have come


def test_disk_stash_reads_an_update_back_exactly_and_removes_its_folder():
    updates, _ = fixed_updates(1)
    stash = DiskStash()
    load = stash(updates[0])
    folder = stash.folder
    back = load()
    assert back.client_id == updates[0].client_id and back.num_examples == updates[0].num_examples
    assert all(torch.equal(back.modules[n].A, f.A) and torch.equal(back.modules[n].B, f.B) and back.modules[n].scale == f.scale for n, f in updates[0].modules.items())
    stash.close()
    assert not folder.exists()
