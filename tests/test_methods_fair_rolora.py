"""LoRA-FAIR, RoLoRA and HetLoRA's client-level weighting against independent dense references
(hypothesis: random shapes, ranks, weights), and typed method options (issue 27, item 7)."""

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.cli import main
from flexlora.compare import expand_runs
from flexlora.config import ConfigDeprecation, ConfigError, TrainConfig, config_changes, load_config, load_config_dict
from flexlora.methods import FedAvg, HetLoRA, LoRAFAIR, RoLoRA, get_method
from flexlora.methods.base import zero_pad
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, UpdateError

from strategies import federations
from tiny import make_peft_adapter

F64 = torch.float64
SETTINGS = settings(max_examples=30, deadline=None)
SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


def data_weights(updates):
    n = torch.tensor([u.num_examples for u in updates], dtype=F64)
    return (n / n.sum()).tolist()


def exact_average(updates, name, p):
    return sum(w * u.modules[name].scale * u.modules[name].B.double() @ u.modules[name].A.double() for w, u in zip(p, updates))


def fro(t):
    return float(torch.linalg.matrix_norm(t))


# -- LoRA-FAIR ---------------------------------------------------------------------------------------
@SETTINGS
@given(federations(same_rank=True), st.sampled_from([0.0, 0.01, 0.5]))
def test_lora_fair_correction_solves_its_objective_and_beats_fedit(fed, regularization):
    updates, shapes = fed
    p = data_weights(updates)
    state = LoRAFAIR(regularization=regularization, dtype=F64).aggregate(updates)
    fedit = FedAvg(dtype=F64).aggregate(updates)
    for name in shapes:
        dW = exact_average(updates, name, p)
        B_avg = sum(w * u.modules[name].scale * u.modules[name].B for w, u in zip(p, updates))
        A_avg = sum(w * u.modules[name].A for w, u in zip(p, updates))
        gm = state.adapter[name]
        torch.testing.assert_close(gm.A, A_avg)  # A is FedIT's average, untouched
        # independent reference: ridge least squares on the dense residual, min ||A^T X - R^T||^2 + mu ||X||^2
        R = dW - B_avg @ A_avg
        r = A_avg.shape[0]
        mu = regularization * float((A_avg * A_avg).sum()) / r
        lhs = torch.cat([A_avg.T, math.sqrt(mu) * torch.eye(r, dtype=F64)]) if mu > 0 else A_avg.T
        rhs = torch.cat([R.T, torch.zeros(r, R.shape[0], dtype=F64)]) if mu > 0 else R.T
        dB_ref = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution.T
        scale = 1 + fro(dW) + fro(B_avg @ A_avg)
        if mu > 0:
            torch.testing.assert_close(gm.B - B_avg, dB_ref, atol=1e-7 * scale, rtol=1e-6)
        else:  # the minimiser's product is unique even where dB is not (a rank-deficient A_avg)
            torch.testing.assert_close(gm.B @ A_avg, (B_avg + dB_ref) @ A_avg, atol=1e-7 * scale, rtol=1e-6)
        # never further from the exact weighted sum than FedIT (dB = 0 is feasible)
        assert fro(gm.delta() - dW) <= fro(fedit.adapter[name].delta() - dW) + 1e-9 * scale


@SETTINGS
@given(federations(same_rank=True, max_clients=1), st.lists(st.integers(1, 500), min_size=2, max_size=4))
def test_lora_fair_equals_fedit_when_clients_agree(fed, sizes):
    (one,), shapes = fed
    updates = [dataclasses.replace(one, client_id=f"c{i}", num_examples=n) for i, n in enumerate(sizes)]
    state = LoRAFAIR(dtype=F64).aggregate(updates)
    fedit = FedAvg(dtype=F64).aggregate(updates)
    for name in shapes:
        torch.testing.assert_close(state.adapter[name].B, fedit.adapter[name].B, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(state.adapter[name].A, fedit.adapter[name].A, atol=0, rtol=0)


def test_lora_fair_clients_continue_from_the_corrected_factors_and_mixed_ranks_are_refused():
    g = torch.Generator().manual_seed(3)
    ups = [ClientUpdate(f"c{i}", 10 * (i + 1), {"m": LoraFactors(torch.randn(3, 6, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64), 2.0)}) for i in range(3)]
    state = LoRAFAIR(dtype=F64).aggregate(ups)
    share = get_method("lora_fair").share_for(state, {"m": ModuleSpec(rank=3, alpha=6.0)})["m"]  # scale 2
    torch.testing.assert_close(share.B.double() * 2.0, state.adapter["m"].B)  # Avg-Initial: B' itself, not FedIT's B
    torch.testing.assert_close(share.A.double(), state.adapter["m"].A)
    assert state.info["correction_rel_norm"]["m"] > 0
    wide = ClientUpdate("w", 5, {"m": LoraFactors(torch.randn(4, 6, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64), 2.0)})
    with pytest.raises(UpdateError, match="lora_fair needs every client at the same rank"):
        LoRAFAIR().aggregate([*ups, wide])


# -- RoLoRA -------------------------------------------------------------------------------------------
@SETTINGS
@given(federations(max_clients=4, max_dim=12, max_rank=5), st.sampled_from(["B", "A"]), st.integers(0, 2**31 - 1))
def test_rolora_rounds_are_exact_in_the_trained_factor_at_any_ranks(fed, first, seed):
    """Four rounds from a fresh state: every client takes its share at its own ranks, changes only
    the round's factor, and the aggregate is the exact weighted average of the products."""
    updates, shapes = fed
    method = RoLoRA(first=first, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    specs = [{n: ModuleSpec(rank=f.rank, alpha=f.scale * f.rank) for n, f in u.modules.items()} for u in updates]
    state = method.initial_state(shapes)
    if first == "A":  # A-first needs a nonzero B to start from: one B-round of the other order
        state = RoLoRA(dtype=F64).aggregate(_train(RoLoRA(dtype=F64), state, updates, specs, 1, g), round=1)
    for rnd in range(1, 5):
        trained = method.trained_factor(rnd)
        assert trained == (first if rnd % 2 else {"A": "B", "B": "A"}[first])
        round_updates = _train(method, state, updates, specs, rnd, g)
        new = method.aggregate(round_updates, round=rnd)
        p = data_weights(round_updates)
        for name in shapes:
            dW = exact_average(round_updates, name, p)
            torch.testing.assert_close(new.adapter[name].delta(), dW, atol=1e-9 * (1 + fro(dW)), rtol=1e-9)
            frozen = "A" if trained == "B" else "B"
            old = getattr(state.adapter[name], frozen)
            kept = getattr(new.adapter[name], frozen)
            if old.numel() and kept.numel():  # the frozen factor is the one the server sent (its leading part)
                k = min(old.shape[0] if frozen == "A" else old.shape[1], kept.shape[0] if frozen == "A" else kept.shape[1])
                a, b = (old[:k], kept[:k]) if frozen == "A" else (old[:, :k], kept[:, :k])
                torch.testing.assert_close(b, a, atol=1e-12 * (1 + fro(a)), rtol=1e-12)
        state = new


def _train(method, state, updates, specs, rnd, g):
    """Each client's share at its ranks, with a random change to the round's trained factor only."""
    trained = method.trained_factor(rnd)
    out = []
    for u, spec in zip(updates, specs):
        share = method.share_for(state, spec)
        mods = {}
        for n, f in share.items():
            A, B = f.A.double(), f.B.double()
            if trained == "A":
                A = A + torch.randn(A.shape, generator=g, dtype=F64)
            else:
                B = B + torch.randn(B.shape, generator=g, dtype=F64)
            mods[n] = LoraFactors(A=A, B=B, scale=f.scale)
        out.append(ClientUpdate(u.client_id, u.num_examples, mods))
    return out


def test_rolora_refuses_a_changed_frozen_factor_and_freezes_it_in_local_training():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 6, generator=g)
    ups = [ClientUpdate(f"c{i}", 10, {"m": LoraFactors(A.clone(), torch.randn(4, 3, generator=g), 1.0)}) for i in range(2)]
    method = RoLoRA()
    state = method.aggregate(ups, round=1)  # A frozen and shared: fine
    torch.testing.assert_close(state.adapter["m"].B, sum(0.5 * u.modules["m"].B for u in ups))
    moved = ClientUpdate("c9", 10, {"m": LoraFactors(A + 0.1, torch.randn(4, 3, generator=g), 1.0)})
    with pytest.raises(UpdateError, match="client c9 changed lora_A of module 'm'"):
        method.aggregate([*ups, moved], round=1)
    with pytest.raises(UpdateError, match="changed lora_B"):  # round 2 keeps B: these clients all differ in B
        method.aggregate(ups, round=2)
    train = TrainConfig()
    assert [(c.freeze_A, c.freeze_B) for c in (method.local_training(train, round=r) for r in (1, 2, 3))] == [(True, False), (False, True), (True, False)]
    assert (RoLoRA(first="A").local_training(train, round=1).freeze_B, get_method("ffa").local_training(train, round=2).freeze_A) == (True, True)
    assert get_method("fedavg").local_training(train, round=2) is train
    assert RoLoRA.dp_release == "factors" and LoRAFAIR.dp_release is None


# -- HetLoRA: one norm per client --------------------------------------------------------------------
@SETTINGS
@given(federations())
def test_hetlora_client_weighting_uses_one_norm_per_client_over_all_modules(fed):
    updates, shapes = fed
    state = HetLoRA(weighting="client", dtype=F64).aggregate(updates)
    p = data_weights(updates)
    norms = [math.sqrt(sum(fro(exact_average([u], n, [1.0])) ** 2 for n in shapes)) for u in updates]
    w = [x / sum(norms) for x in norms] if sum(norms) > 0 else p
    for name in shapes:
        r_max = max(u.modules[name].rank for u in updates)
        B = sum(wk * zero_pad(u.modules[name].scale * u.modules[name].B, r_max, 1) for wk, u in zip(w, updates))
        A = sum(wk * zero_pad(u.modules[name].A, r_max, 0) for wk, u in zip(w, updates))
        torch.testing.assert_close(state.adapter[name].B, B)
        torch.testing.assert_close(state.adapter[name].A, A)
        assert state.info["module_weights"][name] == pytest.approx(w)  # the same weights in every module
    assert not HetLoRA(weighting="client").uses_weights


# -- typed method options (issue 27, item 7) -----------------------------------------------------------
@pytest.mark.parametrize(
    "method, options, message",
    [
        ("florist", {"threshold": "abc"}, "method 'florist': option threshold must be a finite number (float), got 'abc'"),
        ("florist", {"threshold": 2}, "threshold must be in (0, 1], got 2.0"),
        ("flexlora", {"keep_rank": 1.5}, "option keep_rank must be an integer or none, got 1.5"),
        ("flexlora", {"svd_path": "fast"}, "option svd_path must be one of 'auto', 'factored', 'dense', got 'fast'"),
        ("hetlora", {"weighting": True}, "option weighting must be one of 'norm', 'client', 'data', 'norm_x_data'"),
        ("hetlora", {"gamma": 0}, "gamma must be in (0, 1], got 0.0"),
        ("hetlora", {"penalty": -1}, "penalty must be a finite number >= 0, got -1.0"),
        ("hetlora", {"prune": "yes"}, "option prune must be true or false, got 'yes'"),
        ("lora_fair", {"regularization": -1}, "regularization must be a finite number >= 0"),
        ("lora_fair", {"regularization": "nan"}, "option regularization must be a finite number (float)"),
        ("rolora", {"first": "C"}, "option first must be one of 'B', 'A'"),
        ("fedavg", {"device": "gpu"}, "option device must be a device"),
    ],
)
def test_method_options_are_typed_and_range_checked(method, options, message):
    with pytest.raises(ValueError) as e:
        get_method(method, **options)
    assert message in str(e.value)
    assert get_method("florist", threshold="0.5").threshold == 0.5  # a numeric string is a number


def test_bad_method_options_are_one_line_in_aggregate_run_and_compare(tmp_path, capsys):
    paths = [make_peft_adapter(tmp_path / "a", seed=1), make_peft_adapter(tmp_path / "b", seed=2)]
    assert main(["aggregate", *map(str, paths), "--method", "florist", "--out", str(tmp_path / "o"), "--option", "threshold=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "option threshold must be a finite number (float), got 'abc'" in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="federation.method_options: method 'hetlora': option weighting must be one of"):
        load_config(SMOKE, ['federation.aggregation="hetlora"', 'federation.method_options={weighting = "sizes"}'])
    base = load_config_dict(SMOKE)
    base["compare"] = [{"label": "ok", "federation": {"aggregation": "fedavg"}}, {"label": "bad", "federation": {"aggregation": "florist", "method_options": {"threshold": "x"}}}]
    with pytest.raises(ConfigError, match="option threshold must be a finite number"):
        expand_runs(base)


# -- a method's options live in the method; the train.* keys they had still load (issue 22, item 5) ---------
def test_old_hetlora_train_keys_load_as_its_options_with_one_line_notes():
    new = load_config(SMOKE, ['federation.aggregation="hetlora"', "federation.method_options={penalty = 5.0, gamma = 0.5, prune = true}"])
    with pytest.warns(ConfigDeprecation) as notes:
        old = load_config(SMOKE, ['federation.aggregation="hetlora"', "train.hetlora_lambda=5.0", "train.hetlora_gamma=0.5", "train.hetlora_prune=true"])
    assert old.to_dict() == new.to_dict()  # the same config, so the same run
    assert [str(n.message) for n in notes] == [
        f"train.hetlora_{old_key} is deprecated: use federation.method_options.{key} (hetlora's option; read as that this time)"
        for old_key, key in (("lambda", "penalty"), ("gamma", "gamma"), ("prune", "prune"))
    ]
    assert all(warnings.formatwarning(n.message, n.category, n.filename, n.lineno, n.line).count("\n") == 1 for n in notes)  # one line each
    method = get_method("hetlora", **new.federation.method_options)
    assert (method.local_penalty(new.train).weight, method.gamma, method.prune) == (5.0, 0.5, True)
    # a checkpoint's config from before the move (the keys in [train]) is the same config
    saved = new.to_dict()
    saved["federation"]["method_options"] = {}
    saved["train"].update(hetlora_lambda=5.0, hetlora_gamma=0.5, hetlora_prune=True)
    assert config_changes(saved, new) == []
    with pytest.raises(ConfigError, match="disagree; keep federation.method_options.gamma only"):
        load_config(SMOKE, ['federation.aggregation="hetlora"', "train.hetlora_gamma=0.5", "federation.method_options={gamma = 0.6}"])
    with pytest.warns(ConfigDeprecation):  # at its default an old key changes nothing, with any method
        assert load_config(SMOKE, ["train.hetlora_gamma=0.99"]).federation.method_options == {}
    with pytest.warns(ConfigDeprecation), pytest.raises(ConfigError, match="federation.method_options: .*gamma must be in \\(0, 1\\]"):
        load_config(SMOKE, ['federation.aggregation="hetlora"', "train.hetlora_gamma=1.5"])  # HetLoRA checks its own ranges


def test_a_run_refuses_method_options_it_sets_itself(tmp_path, capsys):
    """dtype, seed and device come from federation.*: given in method_options too, the run's method
    call got them twice (a TypeError traceback after the model had loaded)."""
    for option, key in (("seed", "federation.seed"), ("dtype", "federation.server_dtype"), ("device", "federation.server_device")):
        with pytest.raises(ConfigError, match=f"federation.method_options.{option}: a run sets the method's {option} from {key}"):
            load_config(SMOKE, [f'federation.method_options={{{option} = "1"}}'])
    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "r"), "--set", "federation.method_options={seed = 1}"]) == 2
    assert "federation.seed" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_method_with_its_own_share_keeps_its_whole_state_in_checkpoints():
    class OwnShare(FedAvg):
        def share_for(self, state, spec):
            return super().share_for(state, spec)

    assert FedAvg.share_reads_leading_ranks and not OwnShare.share_reads_leading_ranks


def test_rolora_outside_a_run_finds_the_shared_factor():
    g = torch.Generator().manual_seed(6)
    A, B = torch.randn(3, 6, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    trained_B = [ClientUpdate(f"c{i}", 10 + i, {"m": LoraFactors(A.clone(), torch.randn(4, 3, generator=g, dtype=F64), 1.0)}) for i in range(2)]
    trained_A = [ClientUpdate(f"c{i}", 10 + i, {"m": LoraFactors(torch.randn(3, 6, generator=g, dtype=F64), B.clone(), 1.0)}) for i in range(2)]
    for ups, trained in ((trained_B, "B"), (trained_A, "A")):
        state = RoLoRA(dtype=F64).aggregate(ups)  # round 0: `flexlora aggregate`
        assert state.info["trained"] == trained
        dW = exact_average(ups, "m", data_weights(ups))
        torch.testing.assert_close(state.adapter["m"].delta(), dW)
    mixed = [trained_B[0], trained_A[1]]
    with pytest.raises(UpdateError, match="share neither lora_A nor lora_B"):
        RoLoRA().aggregate(mixed)
