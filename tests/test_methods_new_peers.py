"""FLoRIST and FedEx-LoRA against independent dense references (hypothesis: random shapes, ranks, weights)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.methods import FedExLoRA, FLoRIST, get_method
from flexlora.update import ModuleSpec, UpdateError

from strategies import federations

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def exact_average(updates, name):
    n = torch.tensor([u.num_examples for u in updates], dtype=F64)
    p = (n / n.sum()).tolist()
    return sum(w * u.modules[name].scale * u.modules[name].B.double() @ u.modules[name].A.double() for w, u in zip(p, updates)), p


@SETTINGS
@given(federations(), st.sampled_from([0.5, 0.8, 0.9, 0.99]))
def test_florist_keeps_the_smallest_rank_holding_the_energy_and_its_best_approximation(fed, threshold):
    updates, shapes = fed
    state = FLoRIST(threshold=threshold, dtype=F64).aggregate(updates)
    for name in shapes:
        dW, _ = exact_average(updates, name)
        S = torch.linalg.svdvals(dW)
        energy = torch.cumsum(S.square(), 0) / S.square().sum()
        k = int((energy < threshold - 1e-12).sum()) + 1  # smallest k reaching the threshold (dense reference)
        gm = state.base_delta[name]
        assert gm.rank == k and state.info["global_ranks"][name] == k
        optimal = float(S[k:].square().sum().sqrt())  # Eckart-Young: the kept update is dW's best rank-k approximation
        assert float(torch.linalg.matrix_norm(dW - gm.delta())) == pytest.approx(optimal, abs=1e-8 * (1 + float(S.sum())))
        assert state.adapter[name].rank == 0  # every client restarts LoRA and merges the global update



def test_florist_at_threshold_one_keeps_directions_below_the_rounding_tolerance():
    """A direction holding 1e-14 of the energy (singular value 1e-7 of the largest) is kept at
    threshold 1: FLoRA's exact update, not one 1e-7 away (hypothesis found 1e-6)."""
    from flexlora.methods.florist import energy_rank

    S = torch.tensor([89.0, 0.1, 8.9e-6], dtype=F64)
    assert energy_rank(S, 1.0) == 3
    assert energy_rank(torch.tensor([1.0, 1e-7, 0.0], dtype=F64), 1.0) == 2  # exact zeros add nothing
    assert energy_rank(S, 0.99) == 1

@SETTINGS
@given(federations())
def test_florist_at_threshold_one_is_flora_exact(fed):
    updates, shapes = fed
    state = FLoRIST(threshold=1.0, dtype=F64).aggregate(updates)
    for name in shapes:
        dW, _ = exact_average(updates, name)
        torch.testing.assert_close(state.base_delta[name].delta(), dW, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(federations(same_rank=True))
def test_fedex_adapter_is_the_mean_of_the_factors_and_adds_the_exact_residual(fed):
    updates, shapes = fed
    method = FedExLoRA(dtype=F64)
    state = method.aggregate(updates)
    for name in shapes:
        dW, p = exact_average(updates, name)
        mean_B = sum(w * u.modules[name].scale * u.modules[name].B for w, u in zip(p, updates))
        mean_A = sum(w * u.modules[name].A for w, u in zip(p, updates))
        torch.testing.assert_close(state.adapter[name].B, mean_B, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(state.adapter[name].A, mean_A, atol=1e-10, rtol=1e-10)
        residual = dW - mean_B @ mean_A
        torch.testing.assert_close(state.base_delta[name].delta(), residual, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(state.adapter[name].delta() + state.base_delta[name].delta(), dW, atol=1e-9, rtol=1e-9)
        # a client continues from the averaged factors at its own scale
        r = updates[0].modules[name].rank
        share = method.share_for(state, {name: ModuleSpec(rank=r, alpha=updates[0].modules[name].scale * r)})[name]
        torch.testing.assert_close(share.scale * share.B @ share.A, mean_B @ mean_A, atol=1e-9, rtol=1e-9)


def test_fedex_refuses_mixed_ranks_and_florist_refuses_a_bad_threshold():
    from flexlora.update import ClientUpdate, LoraFactors

    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(f"c{r}", 10, {"m": LoraFactors(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), 16 / r)}) for r in (2, 4)]
    with pytest.raises(UpdateError, match="same rank"):
        FedExLoRA().aggregate(ups)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        get_method("florist", threshold=1.5)


@pytest.mark.parametrize("method, extra", [("florist", []), ("fedex", ['resources.distribution="homo"'])])
def test_both_run_end_to_end_and_merge_into_the_base_weights(tmp_path, method, extra):
    from pathlib import Path

    from flexlora.config import load_config
    from flexlora.simulate import Simulation

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    fast = ["federation.rounds=2", "federation.clients_per_round=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]
    sim = Simulation(load_config(smoke, [*fast, f'federation.aggregation="{method}"', *extra]), tmp_path, progress=False)
    try:
        summary = sim.run()
    finally:
        sim.server.restore_base()
    assert summary["dropped_updates"] == 0 and summary["aggregation"] == method
    assert sim.engine.merged  # the residual (FedEx) or the truncated stack (FLoRIST) is in the base weights
    import json

    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    err = recs[-1]["aggregation"]["max_rel_error_vs_exact"]
    assert err < 1e-5 if method == "fedex" else 0 < err < 1  # FedEx is exact; FLoRIST truncates at 90% energy
