"""Central DP (flexlora.privacy): clipping bound, noise calibration, accounting, and no change when off."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.config import ConfigError, load_config, validate
from flexlora.methods import get_method
from flexlora.privacy import Mechanism, aggregate_private, effective_change_norm, epsilon, factor_change_norm, privatize
from flexlora.rounds import sample_clients
from flexlora.update import ClientUpdate, LoraFactors
from flexlora.validate import screening_norm, update_norm

from strategies import federations

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def dense_update(u, name):
    f = u.modules[name]
    return f.scale * f.B.double() @ f.A.double()


def dense_norm(u):
    return math.sqrt(sum(float(torch.linalg.matrix_norm(dense_update(u, n))) ** 2 for n in u.modules))


def make_updates(shapes, ranks, shared_A=False, seed=0):
    """One update per rank, every module at that rank (shared_A: one A per module, as FFA-LoRA)."""
    g = torch.Generator().manual_seed(seed)
    A0 = {n: torch.randn(max(ranks), s[1], generator=g, dtype=F64) for n, s in shapes.items()}
    return [
        ClientUpdate(f"c{i}", 10 + 7 * i, {n: LoraFactors(A=A0[n][:r].clone() if shared_A else torch.randn(r, s[1], generator=g, dtype=F64), B=torch.randn(s[0], r, generator=g, dtype=F64), scale=16.0 / r) for n, s in shapes.items()})
        for i, r in enumerate(ranks)
    ]


def zero_served(updates):
    """Each client's served share: B = 0 and its own A (as a first round serves a fresh LoRA)."""
    return {u.client_id: {n: LoraFactors(A=f.A.clone(), B=torch.zeros_like(f.B), scale=f.scale) for n, f in u.modules.items()} for u in updates}


def data_weights(updates):
    n = sum(u.num_examples for u in updates)
    return [u.num_examples / n for u in updates]


def dense_state(state, name):
    gm = state.adapter[name]
    return gm.B.double() @ gm.A.double()


@SETTINGS
@given(federations(max_dim=12), st.floats(0.01, 50.0))
def test_every_client_is_clipped_to_the_bound_factored_norm_equals_dense(fed, clip):
    updates, shapes = fed
    method = get_method("flexlora", dtype=F64)
    served = zero_served(updates)
    mech = Mechanism(clip, 0.0, len(updates))
    private = privatize(updates, method, mech, served, None, shapes, None, F64)
    state = aggregate_private(method, private, 1, mech, None)
    factors = []
    for u in updates:
        assert update_norm(u) == pytest.approx(dense_norm(u), rel=1e-9, abs=1e-12)
        assert screening_norm(u) == pytest.approx(dense_norm(u), rel=1e-5, abs=1e-9)  # the screen's cheap form
        assert effective_change_norm(u, served[u.client_id]) == pytest.approx(dense_norm(u), rel=1e-9, abs=1e-12)
        factors.append(min(1.0, clip / dense_norm(u)) if dense_norm(u) > 0 else 1.0)
        assert factors[-1] * dense_norm(u) <= clip * (1 + 1e-12)
    assert private.record["clipped"] == sum(f < 1 for f in factors)
    for n in shapes:  # clipping alone keeps the data-size weights: sum_k p_k c_k U_k
        ref = sum(w * c * dense_update(u, n) for w, c, u in zip(data_weights(updates), factors, updates))
        assert torch.allclose(dense_state(state, n), ref, atol=1e-9 * (1 + float(ref.abs().max())))


@SETTINGS
@given(federations(max_dim=10, max_clients=4), st.floats(0.05, 20.0), st.integers(0, 2**31 - 1))
def test_under_dp_the_global_moves_by_the_clipped_changes_from_each_share(fed, clip, seed):
    """Round 2 of FlexLoRA under DP: previous global + sum_k c_k (U_k - S_k) / m + noise, S_k the client's served share."""
    updates0, shapes = fed
    method = get_method("flexlora", dtype=F64)
    previous = method.aggregate(updates0, round=1)
    g = torch.Generator().manual_seed(seed)
    served, updates = {}, []
    for u in updates0:
        share = method.share_for(previous, u.spec())
        served[u.client_id] = share
        mods = {n: LoraFactors(A=f.A + 0.1 * torch.randn(f.A.shape, generator=g, dtype=F64), B=f.B + 0.1 * torch.randn(f.B.shape, generator=g, dtype=F64), scale=f.scale) for n, f in share.items()}
        updates.append(ClientUpdate(u.client_id, u.num_examples, mods))
    m = len(updates) + 2
    mech = Mechanism(clip, 0.7, m)
    private = privatize(updates, method, mech, served, previous.adapter, shapes, torch.Generator().manual_seed(seed), F64)
    state = aggregate_private(method, private, 2, mech, None)
    for n in shapes:
        changes = []
        for u in updates:
            S = served[u.client_id]
            change = {k: dense_update(u, k) - S[k].scale * S[k].B @ S[k].A for k in shapes}
            norm = math.sqrt(sum(float(torch.linalg.matrix_norm(c)) ** 2 for c in change.values()))
            changes.append(min(1.0, clip / norm) * change[n] if norm > 0 else change[n])
        ref = dense_state(previous, n) + sum(changes) / m + private.noise[n]
        assert torch.allclose(dense_state(state, n), ref, atol=1e-8 * (1 + float(ref.abs().max())))


@SETTINGS
@given(federations(max_dim=12, same_rank=True), st.floats(0.01, 5.0))
def test_factor_methods_clip_the_change_from_the_served_share(fed, clip):
    updates, shapes = fed
    first = zero_served(updates)[updates[0].client_id]  # FedAvg serves everybody the same share
    served = {u.client_id: first for u in updates}
    method = get_method("fedavg", dtype=F64)
    mech = Mechanism(clip, 0.0, len(updates))
    state = aggregate_private(method, privatize(updates, method, mech, served, None, shapes, None, F64), 1, mech, None)
    for n in shapes:  # served + sum_k p_k c_k (factors_k - served), with c_k from the joint factor-change norm
        cs = [min(1.0, clip / factor_change_norm(u, served[u.client_id])) if factor_change_norm(u, served[u.client_id]) > 0 else 1.0 for u in updates]
        ref_B = sum(w * c * u.modules[n].scale * u.modules[n].B for w, c, u in zip(data_weights(updates), cs, updates))
        ref_A = served[updates[0].client_id][n].A + sum(w * c * (u.modules[n].A - served[u.client_id][n].A) for w, c, u in zip(data_weights(updates), cs, updates))
        assert torch.allclose(state.adapter[n].B, ref_B, atol=1e-9) and torch.allclose(state.adapter[n].A, ref_A, atol=1e-9)


def test_privacy_off_leaves_the_run_bit_for_bit(tmp_path):
    """clip_norm = 0 and noise_multiplier = 0 (the defaults) take the plain path: same metrics, same adapters."""
    from pathlib import Path

    from flexlora.cli import main

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
    outs = []
    for i, extra in enumerate(([], ["--set", "privacy.clip_norm=0", "--set", "privacy.noise_multiplier=0"])):
        out = tmp_path / f"run{i}"
        assert main(["run", "--config", smoke, "--out", str(out), "--quiet", "--set", "federation.rounds=1", "--set", "eval.at_start=false", *extra]) == 0
        outs.append(out)
    def strip(rec):  # everything but wall-clock figures
        if isinstance(rec, dict):
            return {k: strip(v) for k, v in rec.items() if k != "timings" and "seconds" not in k and "per_second" not in k}
        return [strip(v) for v in rec] if isinstance(rec, list) else rec

    a, b = ([strip(json.loads(line)) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in outs)
    assert a == b and all("privacy" not in r for r in a)
    from safetensors.torch import load_file

    for sub in sorted(p.name for p in (outs[0] / "final").iterdir()):
        x, y = (load_file(str(o / "final" / sub / "adapter_model.safetensors")) for o in outs)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_noise_has_the_configured_std_and_flexlora_serves_the_svd_of_the_noised_sum():
    shapes = {"m.q_proj": (300, 200), "m.down_proj": (200, 300)}
    updates = make_updates(shapes, (2, 4, 8), seed=1)
    mech = Mechanism(clip_norm=3.0, noise_multiplier=1.3, denominator=5)
    method = get_method("flexlora", dtype=F64)
    private = privatize(updates, method, mech, zero_served(updates), None, shapes, torch.Generator().manual_seed(7), F64)
    noise = torch.cat([private.noise[n].flatten() for n in shapes])
    # 120k draws: the sample std is within 1% of the configured one with overwhelming probability
    assert float(noise.std()) == pytest.approx(mech.noise_std, rel=0.01)
    assert mech.noise_std == pytest.approx(1.3 * 3.0 / 5)
    assert abs(float(noise.mean())) < 5 * mech.noise_std / math.sqrt(noise.numel())
    state = aggregate_private(method, private, 1, mech, None)
    for n in shapes:  # fixed denominator: sum_k clip(U_k) / m + noise, exactly
        ref = sum(dense_update(u, n) for u in private.updates) / len(updates) + private.noise[n]
        ref_clip = sum(min(1.0, 3.0 / dense_norm(u)) * dense_update(u, n) for u in updates) / 5 + private.noise[n]
        got = state.adapter[n].B @ state.adapter[n].A
        assert torch.allclose(got, ref, atol=1e-9) and torch.allclose(got, ref_clip, atol=1e-9)


def test_factor_noise_goes_on_the_released_factors_only():
    shapes = {"m.q_proj": (30, 20), "m.down_proj": (20, 30)}
    updates = make_updates(shapes, (4, 4, 4, 4), shared_A=True, seed=2)
    mech = Mechanism(clip_norm=1.0, noise_multiplier=2.0, denominator=len(updates))
    for method, noised in (("fedavg", {"A", "B"}), ("ffa", {"B"})):
        m = get_method(method, dtype=F64)
        private = privatize(updates, m, mech, zero_served(updates), None, shapes, torch.Generator().manual_seed(3), F64)
        clean = m.aggregate(private.updates, weights=private.weights, round=1)
        noisy = aggregate_private(m, private, 1, mech, torch.Generator().manual_seed(3))
        for n in shapes:
            for f in ("A", "B"):
                diff = getattr(noisy.adapter[n], f) - getattr(clean.adapter[n], f)
                assert bool(diff.abs().sum() > 0) == (f in noised), (method, n, f)


@pytest.mark.parametrize("sampling, n, m, z, rounds", [("poisson", 1000, 10, 1.1, 50), ("poisson", 100, 4, 0.8, 3), ("fixed", 1000, 10, 1.1, 50)])
def test_epsilon_is_the_accountant_librarys_own_answer(sampling, n, m, z, rounds):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if sampling == "poisson":
        acc = RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(m / n, dp_accounting.GaussianDpEvent(z)), rounds)
    else:
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    assert epsilon(z, rounds, 1e-5, sampling, n, m) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert epsilon(z, rounds, 1e-5, sampling, n, m) < epsilon(z, rounds + 10, 1e-5, sampling, n, m)  # spent, never refunded
    assert epsilon(2 * z, rounds, 1e-5, sampling, n, m) < epsilon(z, rounds, 1e-5, sampling, n, m)


def test_poisson_sampling_picks_each_client_at_rate_m_over_n():
    cfg = load_config(None, ["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", "federation.clients_per_round=5"])

    class C:
        def __init__(self, i):
            self.client_id = i

    clients = [C(i) for i in range(50)]
    sizes = [len(sample_clients(clients, cfg.federation, r, cfg.privacy)) for r in range(1, 401)]
    assert len(set(sizes)) > 3 and 0 in sizes or min(sizes) < 5 < max(sizes)  # the round's size varies
    assert sum(sizes) / len(sizes) == pytest.approx(5, rel=0.1)  # 400 rounds: sd of the mean ~0.1
    assert sample_clients(clients, cfg.federation, 7, cfg.privacy) == sample_clients(clients, cfg.federation, 7, cfg.privacy)
    fixed = load_config(None, ["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", 'privacy.sampling="fixed"', "federation.clients_per_round=5"])
    assert {len(sample_clients(clients, fixed.federation, r, fixed.privacy)) for r in range(1, 50)} == {5}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.noise_multiplier=1.0"], "needs privacy.clip_norm"),
        (["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", 'federation.aggregation="hetlora"'], "hetlora has no differentially private form"),
        (["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", 'federation.aggregation="fedex"'], "residual"),
        (["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=1.5"], "privacy.delta"),
        (["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", 'privacy.sampling="uniform"'], "privacy.sampling"),
        (["privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", "federation.min_clients=2"], "min_clients must be 1"),
        (["privacy.clip_norm=-1"], "privacy.clip_norm"),
    ],
)
def test_bad_privacy_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides))


def test_a_dp_run_records_epsilon_per_round_and_in_the_summary(tmp_path):
    from flexlora.cli import main
    from pathlib import Path

    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
    out = tmp_path / "run"
    overrides = ["privacy.clip_norm=0.05", "privacy.noise_multiplier=1.0", "federation.rounds=2"]
    assert main(["run", "--config", smoke, "--out", str(out), "--quiet", *[a for o in overrides for a in ("--set", o)]]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["round"] > 0]
    cfg = load_config(smoke, overrides)
    for r in rounds:
        assert r["privacy"]["epsilon"] == pytest.approx(epsilon(1.0, r["round"], 1e-5, "poisson", 10, 4))
        if "skipped" not in r:
            assert r["privacy"]["noise_std"] == pytest.approx(1.0 * 0.05 / 4)
            assert r["privacy"]["clipped"] == r["privacy"]["of"]  # 0.05 is below every update's norm
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == rounds[-1]["privacy"]["epsilon"]
    assert cfg.privacy.noisy
