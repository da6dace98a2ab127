"""Base algorithm x aggregation (fedavg | fedit | slora) x (every method), and SLoRA's two stages."""

import json
from pathlib import Path

import pytest
import torch

from flexlora.checkpoint import load_checkpoint
from flexlora.config import ConfigError, load_config
from flexlora.methods import METHODS
from flexlora.models import load_model
from flexlora.data.clients import load_clients
from flexlora.simulate import Simulation
from flexlora.update import ModuleSpec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
FAST = ["federation.rounds=2", "federation.clients_per_round=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]


@pytest.fixture(scope="module")
def shared():
    cfg = load_config(SMOKE)
    model, tok = load_model(cfg.model)
    return model, tok, load_clients(cfg)


def _sim(shared, tmp_path, *overrides):
    model, tok, clients = shared
    cfg = load_config(SMOKE, [*FAST, *overrides])
    return Simulation(cfg, tmp_path, model=model, tokenizer=tok, clients=clients, progress=False)


PAIRS = [(alg, agg) for alg in ("fedit", "fedavg", "slora") for agg in sorted(METHODS)]


@pytest.mark.parametrize("algorithm, aggregation", PAIRS)
def test_every_sensible_pair_runs_end_to_end(shared, tmp_path, algorithm, aggregation):
    overrides = [f'federation.algorithm="{algorithm}"', f'federation.aggregation="{aggregation}"', "federation.slora_rounds=1"]
    if not METHODS[aggregation].supports_heterogeneous_ranks:
        overrides.append('resources.distribution="homo"')  # these need one rank for everybody
    if algorithm == "slora" and METHODS[aggregation].restarts_adapter:
        with pytest.raises(ConfigError, match=f"{METHODS[aggregation].__name__} restarts LoRA"):  # FLoRA, FLoRIST
            load_config(SMOKE, [*FAST, *overrides])
        return
    sim = _sim(shared, tmp_path, *overrides)
    try:
        summary = sim.run()
    finally:
        sim.server.restore_base()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    assert all(r.get("train_loss") is not None for r in recs)
    assert summary["dropped_updates"] == 0
    if algorithm == "slora":
        assert recs[0]["stage"] == "slora-sparse" and "slora_transition" in recs[0] and "stage" not in recs[1]
    if algorithm == "fedavg":
        assert sim.cfg.train.optimizer == "sgd"


def test_slora_masks_respect_their_density_and_are_fixed_per_client(shared, tmp_path):
    sim = _sim(shared, tmp_path, 'federation.algorithm="slora"')
    client = sim.server.fed.train_clients[0]
    spec = sim.server.fed.specs[client.client_id]
    masks = sim.warmup.masks(client, spec)
    for name, m in masks.items():
        d_out, d_in = m.shape
        density = min(1.0, spec[name].rank * (d_in + d_out) / (d_in * d_out))
        assert abs(float(m.float().mean()) - density) < 4 * (density * (1 - density) / m.numel()) ** 0.5 + 1e-9, name
        assert torch.equal(m, sim.warmup.masks(client, spec)[name])
    other = sim.server.fed.train_clients[1]
    assert any(not torch.equal(masks[n], sim.warmup.masks(other, spec)[n]) for n in masks)


def test_slora_stage1_update_stays_on_the_mask(shared, tmp_path):
    from flexlora.slora import train_client_sparse

    sim = _sim(shared, tmp_path, 'federation.algorithm="slora"')
    client = sim.server.fed.train_clients[0]
    masks = sim.warmup.masks(client, sim.server.fed.specs[client.client_id])
    before = {n: sim.server.model.get_submodule(n).weight.detach().clone() for n in masks}
    res = train_client_sparse(sim.server.model, sim.server.tokenizer, client, masks, sim.cfg.train, seed=0)
    for n, d in res.deltas.items():
        assert float(d[~masks[n]].abs().max()) == 0.0
        assert float(d.abs().max()) > 0
        assert torch.equal(sim.server.model.get_submodule(n).weight, before[n])  # base weights restored


def test_slora_stage2_init_is_the_truncated_svd_of_the_stage1_update(shared, tmp_path):
    sim = _sim(shared, tmp_path, 'federation.algorithm="slora"', "federation.slora_rounds=1", "federation.rounds=1", 'federation.server_dtype="float64"')
    try:
        sim.run()
    finally:
        sim.server.restore_base()
    from flexlora.checkpoint import load_checkpoint, state_from_dict

    state = state_from_dict(load_checkpoint(tmp_path)["state"])
    assert state.info.get("slora_init") is True
    for name, delta in list(sim.warmup.stage1_delta.items())[:4]:
        dense = delta.double()
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        for r in (2, 16):
            share = sim.server.method.share_for(state, {name: ModuleSpec(r, 16.0)})[name]
            ref = (U[:, :r] * S[:r]) @ Vh[:r]
            torch.testing.assert_close(share.scale * share.B.double() @ share.A.double(), ref, atol=1e-9 * float(S[0]) + 1e-12, rtol=1e-6)
    # stage 2 starts from the original base weights (the sparse update now lives in the adapter)
    for name, w0 in sim.server.originals.items():
        assert torch.equal(sim.server.model.get_submodule(name).weight, w0)


def test_hetlora_self_pruning_shrinks_ranks_and_survives_a_checkpoint(shared, tmp_path):
    sim = _sim(
        shared, tmp_path, 'federation.aggregation="hetlora"', "federation.rounds=4", "federation.clients_per_round=8",
        "federation.method_options={prune = true, penalty = 5.0, gamma = 0.5}", "train.max_steps=2",
    )
    try:
        sim.run()
    finally:
        sim.server.restore_base()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    pruned = {str(c["id"]): (r["round"], c["pruned_to"]) for r in recs for c in r["clients"] if "pruned_to" in c}
    assert pruned, "no client pruned its rank"
    ranks = sim.engine.client_state["hetlora_ranks"]
    assert set(pruned) <= set(ranks)
    for cid, (rnd, to) in pruned.items():
        declared = sim.server.fed.specs[int(cid)]
        assert all(ranks[cid][n] <= declared[n].rank for n in declared) and any(ranks[cid][n] < declared[n].rank for n in declared)
        later = [c for r in recs if r["round"] > rnd for c in r["clients"] if str(c["id"]) == cid]
        assert all(max(c["ranks"].values()) <= max(to.values()) for c in later)  # trains at the pruned rank afterwards
    assert load_checkpoint(tmp_path)["client_state"]["hetlora_ranks"] == ranks


def test_hetlora_pruning_needs_hetlora_aggregation():
    with pytest.raises(ConfigError, match="hetlora_prune"):
        load_config(SMOKE, [*FAST, "train.hetlora_prune=true"])


def test_rslora_runs_with_alpha_over_sqrt_r(shared, tmp_path):
    sim = _sim(shared, tmp_path, "lora.rslora=true", "federation.rounds=2")
    try:
        summary = sim.run()
    finally:
        sim.server.restore_base()
    specs = [s for spec in sim.server.fed.specs.values() for s in spec.values()]
    assert specs and all(s.rslora and s.scale == s.alpha / s.rank**0.5 for s in specs)
    assert summary["dropped_updates"] == 0  # PEFT's scaling matched the shares' (load_share checks it)


def test_the_old_fedavg_algorithm_name_still_loads_says_its_new_name_and_resumes_old_checkpoints():
    import warnings

    from flexlora.algorithms import ALGORITHMS
    from flexlora.config import ConfigDeprecation, config_changes

    with pytest.warns(ConfigDeprecation, match="is now called 'fedavg_sgd'"):
        old = load_config(SMOKE, ['federation.algorithm="fedavg"'])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = load_config(SMOKE, ['federation.algorithm="fedavg_sgd"'])
    assert old.to_dict() == new.to_dict() and new.train.optimizer == ALGORITHMS["fedavg_sgd"].optimizer == "sgd"
    saved = new.to_dict()  # config.json of a run made before the rename
    saved["federation"]["algorithm"] = "fedavg"
    assert config_changes(saved, new) == []
    assert config_changes({**saved, "federation": {**saved["federation"], "algorithm": "fedit"}}, new) == ["federation.algorithm: 'fedit' -> 'fedavg_sgd'"]
    with pytest.raises(ConfigError, match="is not one of fedit, fedavg_sgd, slora"):
        load_config(SMOKE, ['federation.algorithm="sgd"'])


def test_slora_stage_folds_in_plan_order_and_screens_like_a_lora_round(tmp_path):
    """SLoRA's stage screens its dense updates as the engine screens LoRA ones (shapes, NaN, then the
    median norm screen) and still sums the accepted ones in the plan's order, holding on disk what the
    screen could still reject."""
    from flexlora.slora import DenseFold
    from flexlora.validate import ValidationConfig

    shapes = {"a": (3, 4), "b": (2, 5)}
    g = torch.Generator().manual_seed(0)
    ups = {c: {n: torch.randn(s, generator=g) for n, s in shapes.items()} for c in "pqrst"}
    ups["s"] = {n: d * 1e8 for n, d in ups["s"].items()}  # an absurd norm
    ups["t"] = {**ups["t"], "a": torch.full((3, 4), float("nan"))}
    fold = DenseFold(shapes, torch.float64, ValidationConfig(norm_factor=100.0), list("pqrstu"))
    for i, c in enumerate("pqrst"):
        fold.add(c, i + 1, ups[c])
        assert len(fold.pending) <= i + 1
    assert fold.folder is not None and any(fold.folder.iterdir())  # the first ones wait on disk
    fold.absent("u")
    accepted, rejected = fold.settle()
    assert accepted == list("pqr") and set(rejected) == {"s", "t"}
    assert "exceeds 100 x the round median" in rejected["s"][0] and "NaN" in rejected["t"][0]
    assert not fold.folder.exists()
    for n, s in shapes.items():
        want = torch.zeros(s, dtype=torch.float64)
        for i, c in enumerate("pqr"):
            want += (i + 1) * ups[c][n].to(torch.float64)
        assert torch.equal(fold.mean()[n], want / 6)


def test_slora_stage_rejects_the_garbage_the_failures_inject(shared, tmp_path):
    from flexlora.failures import client_failure, garbage_kind

    sim = _sim(shared, tmp_path, 'federation.algorithm="slora"', "federation.slora_rounds=1", "federation.rounds=1",
               "federation.clients_per_round=6", "failures.garbage=0.5")
    try:
        sim.run()
    finally:
        sim.server.restore_base()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["stage"] == "slora-sparse" and "aggregation" not in rec
    kinds = {}
    for e in rec["clients"]:
        failure, rng = client_failure(sim.cfg.federation.seed, sim.cfg.failures, 1, e["id"])
        if failure == "garbage":
            kinds[str(e["id"])] = garbage_kind(sim.engine.fed.shapes, rng)[0]
    assert {"nan", "shape"} & set(kinds.values())  # this seed draws them
    for cid, kind in kinds.items():
        if kind in ("nan", "shape"):
            assert cid in rec["dropped"], (cid, kind)
    assert set(rec["dropped"]) <= set(kinds)
    assert all(e["status"] == ("rejected" if str(e["id"]) in rec["dropped"] else "ok") for e in rec["clients"])
