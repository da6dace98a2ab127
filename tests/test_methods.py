"""Every method against an independent dense reference (hypothesis: random shapes, ranks, weights)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.methods import METHODS, FedAvg, FFALoRA, FLoRA, FlexLoRA, HetLoRA, RankPartition, get_method
from flexlora.methods.hetlora import self_prune, self_pruning_penalty
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, UpdateError

from strategies import federations

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def dense_delta(f: LoraFactors) -> torch.Tensor:
    return f.scale * f.B.double() @ f.A.double()


def data_weights(updates):
    n = torch.tensor([u.num_examples for u in updates], dtype=F64)
    return (n / n.sum()).tolist()


def exact_average(updates, name, p):
    return sum(w * dense_delta(u.modules[name]) for w, u in zip(p, updates))


def spec_of(u):
    return u.spec()


@SETTINGS
@given(federations(), st.sampled_from(["B", "sqrt"]), st.integers(1, 10))
def test_flexlora_share_is_best_rank_r_approximation(fed, split, target_rank):
    updates, shapes = fed
    p = data_weights(updates)
    method = FlexLoRA(singular_values=split, dtype=F64)
    state = method.aggregate(updates)
    for name in shapes:
        dW = exact_average(updates, name, p)  # alpha/r applied before averaging, weights n_k / sum n
        S = torch.linalg.svdvals(dW)
        spec = {name: ModuleSpec(rank=target_rank, alpha=16.0)}
        share = method.share_for(state, spec)[name]
        assert (share.rank, share.d_out, share.d_in) == (target_rank, *shapes[name])
        assert math.isclose(share.scale, 16.0 / target_rank)
        approx = dense_delta(share)
        optimal = float(S[target_rank:].square().sum().sqrt())  # Eckart-Young
        assert float(torch.linalg.matrix_norm(dW - approx)) == pytest.approx(optimal, abs=1e-7 * (1 + float(S.sum())))
        # the global adapter itself is the exact aggregate
        torch.testing.assert_close(state.adapter[name].delta(), dW, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(federations(same_rank=True))
def test_fedavg_with_equal_ranks_is_the_mean_of_the_factors(fed):
    updates, shapes = fed
    p = data_weights(updates)
    method = FedAvg(dtype=F64)
    state = method.aggregate(updates)
    for u in updates[:1]:
        share = method.share_for(state, spec_of(u))
        for name in shapes:
            meanB = sum(w * v.modules[name].B for w, v in zip(p, updates))
            meanA = sum(w * v.modules[name].A for w, v in zip(p, updates))
            torch.testing.assert_close(share[name].B, meanB, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(share[name].A, meanA, atol=1e-10, rtol=1e-10)


def test_fedavg_refuses_mixed_ranks_with_a_clear_error():
    g = torch.Generator().manual_seed(0)
    mk = lambda r, cid: ClientUpdate(cid, 10, {"m": LoraFactors(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), 16 / r)})  # noqa: E731
    with pytest.raises(UpdateError, match="same rank per module.*'m'"):
        FedAvg().aggregate([mk(4, "a"), mk(8, "b")])
    with pytest.raises(UpdateError, match="same rank"):
        FedAvg().check_specs([{"m": ModuleSpec(4, 16)}, {"m": ModuleSpec(8, 16)}])


@SETTINGS
@given(federations())
def test_hetlora_pads_weights_by_norm_and_truncates(fed):
    updates, shapes = fed
    method = HetLoRA(dtype=F64)
    state = method.aggregate(updates)
    for name in shapes:
        norms = [float(torch.linalg.matrix_norm(dense_delta(u.modules[name]))) for u in updates]
        w = [n / sum(norms) for n in norms]
        r_max = max(u.modules[name].rank for u in updates)
        d_out, d_in = shapes[name]
        B = torch.zeros(d_out, r_max, dtype=F64)
        A = torch.zeros(r_max, d_in, dtype=F64)
        for wk, u in zip(w, updates):
            f = u.modules[name]
            B[:, : f.rank] += wk * f.scale * f.B
            A[: f.rank] += wk * f.A
        for u in updates:
            f = u.modules[name]
            share = method.share_for(state, {name: ModuleSpec(f.rank, f.scale * f.rank)})[name]
            torch.testing.assert_close(dense_delta(share), B[:, : f.rank] @ A[: f.rank], atol=1e-9, rtol=1e-9)


@SETTINGS
@given(federations())
def test_flora_stack_reproduces_the_weighted_sum_exactly(fed):
    updates, shapes = fed
    p = data_weights(updates)
    state = FLoRA(dtype=F64).aggregate(updates)
    assert state.info["merge_into_base"] is True and state.base_delta is not None
    for name in shapes:
        torch.testing.assert_close(state.base_delta[name].delta(), exact_average(updates, name, p), atol=1e-10, rtol=1e-10)
        assert state.base_delta[name].rank == sum(u.modules[name].rank for u in updates)
        share = FLoRA(dtype=F64).share_for(state, {name: ModuleSpec(4, 16.0)})[name]
        assert float(share.B.abs().max()) == 0.0 and float(share.A.abs().max()) > 0  # fresh LoRA init


@SETTINGS
@given(federations(shared_A=True))
def test_ffa_averages_B_with_the_shared_A(fed):
    updates, shapes = fed
    p = data_weights(updates)
    method = FFALoRA(dtype=F64)
    state = method.aggregate(updates)
    for name in shapes:
        torch.testing.assert_close(state.adapter[name].delta(), exact_average(updates, name, p), atol=1e-10, rtol=1e-10)
        share = method.share_for(state, spec_of(updates[0]))[name]
        torch.testing.assert_close(share.A, updates[0].modules[name].A)


def test_ffa_refuses_clients_that_changed_A():
    A = torch.randn(4, 6)
    u1 = ClientUpdate("a", 1, {"m": LoraFactors(A, torch.randn(5, 4), 4.0)})
    u2 = ClientUpdate("b", 1, {"m": LoraFactors(A + 1e-3, torch.randn(5, 4), 4.0)})
    with pytest.raises(UpdateError, match="client b changed the frozen lora_A of module 'm'"):
        FFALoRA().aggregate([u1, u2])


@SETTINGS
@given(federations(), st.sampled_from(["truncate", "svd"]))
def test_rank_partition_averages_each_column_over_its_owners(fed, redistribute):
    updates, shapes = fed
    p = data_weights(updates)
    method = RankPartition(redistribute=redistribute, dtype=F64)
    state = method.aggregate(updates)
    for name in shapes:
        r_max = max(u.modules[name].rank for u in updates)
        d_out, d_in = shapes[name]
        B = torch.zeros(d_out, r_max, dtype=F64)
        A = torch.zeros(r_max, d_in, dtype=F64)
        for j in range(r_max):
            owners = [(w, u.modules[name]) for w, u in zip(p, updates) if u.modules[name].rank > j]
            total = sum(w for w, _ in owners)
            B[:, j] = sum(w * f.scale * f.B[:, j] for w, f in owners) / total
            A[j] = sum(w * f.A[j] for w, f in owners) / total
        torch.testing.assert_close(state.adapter[name].delta(), B @ A, atol=1e-9, rtol=1e-9)


def test_single_client_round_trip_is_identity_for_every_heterogeneous_method():
    g = torch.Generator().manual_seed(1)
    f = LoraFactors(torch.randn(6, 10, generator=g, dtype=F64), torch.randn(7, 6, generator=g, dtype=F64), 16 / 6)
    u = ClientUpdate("only", 3, {"m": f})
    for name in ["flexlora", "hetlora", "rank_partition", "fedavg", "ffa"]:
        method = get_method(name, dtype=F64)
        share = method.share_for(method.aggregate([u]), u.spec())["m"]
        torch.testing.assert_close(dense_delta(share), dense_delta(f), atol=1e-10, rtol=1e-10)


def test_share_above_the_aggregate_rank_pads_with_trainable_rows():
    """A rank-8 client receiving a rank-2 aggregate: extra columns of B are zero, extra rows of A are not
    (zero rows in both would have zero gradient forever)."""
    g = torch.Generator().manual_seed(2)
    u = ClientUpdate("a", 1, {"m": LoraFactors(torch.randn(2, 12, generator=g, dtype=F64), torch.randn(9, 2, generator=g, dtype=F64), 8.0)})
    method = FlexLoRA(dtype=F64)
    state = method.aggregate([u])
    share = method.share_for(state, {"m": ModuleSpec(8, 16.0)})["m"]
    assert share.rank == 8
    torch.testing.assert_close(dense_delta(share), dense_delta(u.modules["m"]), atol=1e-10, rtol=1e-10)
    assert float(share.B[:, 2:].abs().max()) == 0.0
    assert float(share.A[2:].abs().min()) > 0.0
    again = method.share_for(state, {"m": ModuleSpec(8, 16.0)})["m"]
    torch.testing.assert_close(again.A, share.A)  # deterministic


def test_initial_state_gives_every_client_a_prefix_of_one_fresh_init():
    method = FedAvg()
    state = method.initial_state({"m": (5, 7)})
    small = method.share_for(state, {"m": ModuleSpec(2, 16.0)})["m"]
    big = method.share_for(state, {"m": ModuleSpec(6, 16.0)})["m"]
    torch.testing.assert_close(big.A[:2], small.A)
    assert float(big.B.abs().max()) == 0.0
    assert float(big.A.abs().max()) <= 1 / math.sqrt(7)


def test_scale_is_applied_before_averaging():
    """Two clients with the same B A but different ranks/alphas: the aggregate weighs effective updates."""
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(8, 2, generator=g, dtype=F64), torch.randn(2, 9, generator=g, dtype=F64)
    u1 = ClientUpdate("r2", 1, {"m": LoraFactors(A, B, 16 / 2)})
    u2 = ClientUpdate("r4", 1, {"m": LoraFactors(torch.cat([A, torch.zeros(2, 9, dtype=F64)]), torch.cat([B, torch.zeros(8, 2, dtype=F64)], 1), 16 / 4)})
    state = FlexLoRA(dtype=F64).aggregate([u1, u2])
    expected = 0.5 * (8.0 + 4.0) * (B @ A)
    torch.testing.assert_close(state.adapter["m"].delta(), expected, atol=1e-10, rtol=1e-10)


def test_hetlora_self_pruning_penalty_has_gradients():
    A = torch.randn(8, 5, requires_grad=True)
    B = torch.randn(6, 8, requires_grad=True)
    penalty = self_pruning_penalty(A, B, gamma=0.75)
    penalty.backward()
    assert A.grad is not None and float(A.grad[6:].abs().sum()) > 0 and float(A.grad[:6].abs().sum()) == 0
    assert float(B.grad[:, 6:].abs().sum()) > 0


def test_hetlora_self_prune_drops_the_tail_only_when_it_shrank():
    g = torch.Generator().manual_seed(3)
    mods = {"q": LoraFactors(torch.randn(8, 5, generator=g, dtype=F64), torch.randn(6, 8, generator=g, dtype=F64), 2.0),
            "v": LoraFactors(torch.randn(4, 7, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64), 4.0)}
    u = ClientUpdate("c", 10, mods)
    tail = sum(float(torch.linalg.matrix_norm(f.B[:, q:]) * torch.linalg.matrix_norm(f.A[q:])) for f, q in ((mods["q"], 6), (mods["v"], 3)))
    first, t0, pruned = self_prune(u, 0.75, previous_tail_norm=None)  # no history yet: keep everything
    assert first is u and not pruned and math.isclose(t0, tail, rel_tol=1e-12)
    same, _, pruned = self_prune(u, 0.75, previous_tail_norm=tail)  # not smaller: keep
    assert same is u and not pruned
    cut, _, pruned = self_prune(u, 0.75, previous_tail_norm=tail * 1.01)
    assert pruned and cut.modules["q"].rank == 6 and cut.modules["v"].rank == 3
    for name, q in (("q", 6), ("v", 3)):  # the kept part of the update is exactly what it was
        f = mods[name]
        torch.testing.assert_close(cut.modules[name].delta(), f.scale * f.B[:, :q] @ f.A[:q], rtol=0, atol=0)
    ones = ClientUpdate("c", 1, {"m": LoraFactors(torch.ones(1, 3, dtype=F64), torch.ones(2, 1, dtype=F64), 1.0)})
    assert self_prune(ones, 0.5, previous_tail_norm=1e9)[0].modules["m"].rank == 1  # never below rank 1
    with pytest.raises(ValueError, match="gamma"):
        self_prune(u, 0.0, None)


def test_bad_inputs_are_named():
    g = torch.Generator().manual_seed(4)
    ok = ClientUpdate("ok", 1, {"m": LoraFactors(torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g), 1.0)})
    nan = ClientUpdate("bad", 1, {"m": LoraFactors(torch.full((2, 4), float("nan")), torch.randn(3, 2, generator=g), 1.0)})
    wide = ClientUpdate("wide", 1, {"m": LoraFactors(torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), 1.0)})
    other = ClientUpdate("other", 1, {"n": ok.modules["m"]})
    for name in METHODS:
        with pytest.raises(UpdateError, match="client bad, module m: lora_A contains NaN"):
            get_method(name).aggregate([ok, nan])
        with pytest.raises(UpdateError, match=r"client wide, module m: layer shape \(3, 5\)"):
            get_method(name).aggregate([ok, wide])
        with pytest.raises(UpdateError, match="client other: module set differs"):
            get_method(name).aggregate([ok, other])
    with pytest.raises(ValueError, match="unknown aggregation method 'nope'"):
        get_method("nope")
    with pytest.raises(UpdateError, match="rank mismatch"):
        LoraFactors(torch.zeros(2, 3), torch.zeros(3, 3), 1.0)
