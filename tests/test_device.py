"""Devices and precision: the CPU path of the device plumbing, low-precision runs, server state that
moves between devices, one client running out of memory. GPU-only checks are marked ``gpu``."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexlora.checkpoint import load_checkpoint, save_checkpoint, state_from_dict, state_to_dict
from flexlora.cli import main
from flexlora.config import ConfigError, TrainConfig, config_changes, load_config
from flexlora.diagnostics import aggregation_report
from flexlora.lowrank import svd_of_sum
from flexlora.methods import get_method
from flexlora.models import resolve_device, resolve_model_dtype
from flexlora.simulate import Simulation
from flexlora.train import LocalTrainer
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, ServerState

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
ONE_ROUND = ["federation.rounds=2", "federation.clients_per_round=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]
CUDA = torch.cuda.is_available()


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _strip(rec):
    if isinstance(rec, dict):
        return {k: _strip(v) for k, v in rec.items() if k != "timings" and "seconds" not in k and "per_second" not in k}
    if isinstance(rec, list):
        return [_strip(v) for v in rec]
    return rec


def _sets(*overrides: str) -> list[str]:
    return sum((["--set", o] for o in overrides), [])


# -- configuration ---------------------------------------------------------------------------------
def test_auto_device_and_dtype_resolve_to_what_is_there():
    device = resolve_device("auto")
    assert device.type == ("cuda" if CUDA else device.type)
    if device.type == "cpu":
        assert resolve_model_dtype("auto", device) == torch.float32
    assert resolve_model_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "override, message",
    [
        ('model.device="cuda"', "model.device: 'cuda' asked for"),
        ('model.device="cuda:3"', "model.device: 'cuda:3' asked for"),
        ('federation.server_device="cuda"', "federation.server_device: 'cuda' asked for"),
        ('model.device="tpu"', "model.device: 'tpu' is not a device"),
        ('model.dtype="float8"', "model.dtype: 'float8' is not one of"),
        ('federation.server_dtype="bfloat16"', "federation.server_dtype: 'bfloat16' is not one of"),
        ('model.quantization="4bit"', "model.quantization"),
        ('model.quantization="3bit"', "model.quantization"),
    ],
)
def test_a_device_or_precision_that_is_not_there_is_refused_before_any_work(tmp_path, capsys, override, message):
    code = main(["run", "--config", SMOKE, "--out", str(tmp_path / "x"), "--quiet", *_sets(override)])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_the_device_flag_is_honoured_by_run_compare_and_eval(tmp_path, capsys):
    for argv in (
        ["run", "--config", SMOKE, "--out", str(tmp_path / "r")],
        ["compare", "--config", SMOKE, "--methods", "flexlora", "--out", str(tmp_path / "c")],
        ["eval", "--config", SMOKE, "--data-kind", "suite", "--out", str(tmp_path / "e.json")],
    ):
        assert main([*argv, "--quiet", "--device", "cuda"]) == 2
        assert "model.device: 'cuda' asked for" in capsys.readouterr().err


def test_a_flower_node_may_pick_its_own_device_and_paths_before_anything_is_checked(tmp_path):
    from flexlora.flower import config_from_json, config_to_json

    data = tmp_path / "node-data"
    data.mkdir()
    cfg = load_config(SMOKE)
    text = config_to_json(cfg)
    server_view = json.loads(text)
    server_view["data"].update(kind="ni", path="/path/only/on/the/server")
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_json(json.dumps(server_view))
    node = config_from_json(json.dumps(server_view), {"data-path": str(data), "device": "cpu", "dtype": "bfloat16"})
    assert node.data.path == str(data) and node.model.device == "cpu" and node.model.dtype == "bfloat16"


def test_moving_a_run_between_devices_is_not_a_config_change():
    cfg = load_config(SMOKE)
    saved = cfg.to_dict()
    saved["model"]["device"], saved["federation"]["server_device"] = "cuda:1", "cuda"
    assert config_changes(saved, cfg) == []
    saved["model"]["dtype"] = "float32"  # what "auto" means on a CPU
    if not CUDA:
        assert config_changes(saved, cfg) == []
    saved["model"]["dtype"] = "float16"
    assert config_changes(saved, cfg) and "model.dtype" in config_changes(saved, cfg)[0]


# -- runs -------------------------------------------------------------------------------------------
def test_an_explicit_cpu_device_runs_end_to_end(tmp_path):
    out = tmp_path / "cpu"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--device", "cpu", *_sets(*ONE_ROUND)]) == 0
    recs = _metrics(out)
    assert all(c["status"] == "ok" for r in recs for c in r.get("clients", []))
    assert all({"train", "aggregate", "diagnostics", "checkpoint"} <= set(r["timings"]) for r in recs)


def test_a_bfloat16_model_runs_saves_float32_adapters_and_resumes_bit_identically(tmp_path):
    """bfloat16 base weights: trains, evaluates, aggregates; adapters are float32 on disk; a run that
    lost its last checkpoint resumes from the previous one and ends with the same numbers."""
    overrides = [*ONE_ROUND, 'model.dtype="bfloat16"', "eval.every=1"]
    out = tmp_path / "bf16"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", *_sets(*overrides)]) == 0
    recs = _metrics(out)
    assert all(c["status"] == "ok" for r in recs for c in r["clients"]) and all(r["train_loss"] > 0 for r in recs)
    assert recs[-1]["eval"]["rouge_l_weighted"] is not None
    for sub in (out / "final").iterdir():
        assert {t.dtype for t in load_file(str(sub / "adapter_model.safetensors")).values()} == {torch.float32}
    again = tmp_path / "resumed"
    shutil.copytree(out, again)
    (again / "checkpoint.pt").unlink()  # round 2's checkpoint lost: resume from round 1's
    (again / "summary.json").unlink()
    shutil.rmtree(again / "final")
    assert main(["run", "--config", SMOKE, "--out", str(again), "--quiet", "--resume", *_sets(*overrides)]) == 0
    assert _strip(_metrics(again)) == _strip(recs)
    for sub in (out / "final").iterdir():
        a, b = load_file(str(sub / "adapter_model.safetensors")), load_file(str(again / "final" / sub.name / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lost_metrics_line_is_restored_from_the_checkpoint(tmp_path):
    """Killed after the checkpoint but before its metrics line: resume writes the line from the checkpoint."""
    out = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", *_sets(*ONE_ROUND)]) == 0
    recs = _metrics(out)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "summary.json").unlink()
    shutil.rmtree(again / "final")
    (again / "checkpoint.pt").unlink()
    lines = (again / "metrics.jsonl").read_text().splitlines()
    (again / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n")  # round 1 and 2 lines lost; round 1 is checkpointed
    assert main(["run", "--config", SMOKE, "--out", str(again), "--quiet", "--resume", *_sets(*ONE_ROUND)]) == 0
    assert _strip(_metrics(again)) == _strip(recs)


def test_a_client_that_runs_out_of_memory_is_dropped_and_the_round_goes_on(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, ONE_ROUND)
    sim = Simulation(cfg, tmp_path, progress=False)
    real = LocalTrainer._train_client
    victims = []

    def flaky(self, client, spec, share, seed):
        if not victims:  # the first client of every run blows up half way through its first step
            victims.append(client.client_id)
            peft_model = self.attach(spec)
            self.detach(peft_model)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, client, spec, share, seed)

    monkeypatch.setattr(LocalTrainer, "_train_client", flaky)
    summary = sim.run()
    rec = _metrics(tmp_path)[0]
    status = {c["id"]: c["status"] for c in rec["clients"]}
    assert status[victims[0]] == "oom" and sum(s == "ok" for s in status.values()) == len(status) - 1
    assert "ran out of accelerator memory" in rec["dropped"][str(victims[0])][0]
    assert summary["dropped_updates"] == 1 and summary["skipped_rounds"] == []
    assert not hasattr(sim.server.model, "peft_config")  # no adapter left behind on the shared model


def test_gradient_checkpointing_changes_memory_not_the_update(tiny_model, tiny_tokenizer):
    import copy

    from flexlora.data.types import ClientData, Example

    client = ClientData(client_id=0, category="test", eval=[], train=[Example(instruction=f"Say {w}.", input="", output=f"{w} {w}.") for w in ("one", "two", "three", "four")])
    spec = {f"model.layers.{i}.self_attn.q_proj": ModuleSpec(rank=4, alpha=8.0) for i in range(2)}
    share = {n: LoraFactors(A=torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.1, B=torch.zeros(64, 4), scale=2.0) for n in spec}
    results, calls = [], []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model)
        count, mlp = [0], model.model.layers[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *a, **k: (count.__setitem__(0, count[0] + 1), forward(*a, **k))[1]  # hooks are muted in the recompute
        trainer = LocalTrainer(model, tiny_tokenizer, ["q_proj"], TrainConfig(max_steps=2, batch_size=2, gradient_checkpointing=checkpointing))
        results.append(trainer.train_client(client, spec, share, seed=3))
        calls.append(count[0])
        assert not trainer.model.model.gradient_checkpointing  # switched off again with the adapter
    assert calls[1] == 2 * calls[0]  # the layer's forward ran again in the backward pass: checkpointing was on
    for name in spec:
        a, b = results[0].update.modules[name], results[1].update.modules[name]
        assert torch.allclose(a.B, b.B, atol=1e-6) and torch.allclose(a.A, b.A, atol=1e-6)
        assert float(a.B.abs().max()) > 0
    assert results[0].metrics["loss_first"] == pytest.approx(results[1].metrics["loss_first"], rel=1e-5)


# -- the server ------------------------------------------------------------------------------------
def _updates(shapes, ranks, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, r in enumerate(ranks):
        mods = {n: LoraFactors(A=torch.randn(min(r, *s), s[1], generator=g, dtype=dtype), B=torch.randn(s[0], min(r, *s), generator=g, dtype=dtype), scale=16 / min(r, *s)) for n, s in shapes.items()}
        out.append(ClientUpdate(str(k), 10 + 7 * k, mods))
    return out


def test_a_checkpoint_written_with_one_server_dtype_serves_a_server_of_another(tmp_path):
    shapes = {"a": (48, 40), "b": (24, 64)}
    updates = _updates(shapes, [2, 8, 30])
    state64 = get_method("flexlora", dtype=torch.float64).aggregate(updates, round=3)
    save_checkpoint(tmp_path, {"round": 3, "state": state_to_dict(state64)})
    back = state_from_dict(load_checkpoint(tmp_path)["state"])
    spec = {n: ModuleSpec(rank=5, alpha=16.0) for n in shapes}
    for dtype in (torch.float32, torch.float64):
        method = get_method("flexlora", dtype=dtype, device="cpu")
        share, ref = method.share_for(back, spec), method.share_for(state64, spec)
        for n in shapes:
            assert share[n].A.device.type == "cpu" and torch.equal(share[n].A, ref[n].A) and torch.equal(share[n].B, ref[n].B)
    assert all(gm.A.dtype == torch.float64 and gm.A.device.type == "cpu" for gm in back.adapter.values())


@pytest.mark.parametrize("method", ["flexlora", "fedavg", "hetlora", "flora", "ffa", "rank_partition"])
def test_every_method_returns_its_state_on_the_cpu(method):
    shapes = {"a": (32, 24)}
    ranks = [4, 4] if method in ("fedavg", "ffa") else [2, 6]
    updates = _updates(shapes, ranks)
    if method == "ffa":
        updates[1].modules["a"] = LoraFactors(updates[0].modules["a"].A, updates[1].modules["a"].B, updates[0].modules["a"].scale)
    state = get_method(method, device="cpu").aggregate(updates)
    for group in (state.adapter, state.base_delta or {}):
        for gm in group.values():
            assert gm.A.device.type == gm.B.device.type == "cpu"


def test_diagnostics_read_off_the_spectrum_match_the_computed_ones():
    """The fast report (exact methods: spectrum + probe estimate) agrees with the full computation,
    and the probe estimate sees a wrong aggregate."""
    shapes = {"a": (64, 48), "b": (96, 32)}
    updates = _updates(shapes, [4, 16, 40], seed=5)
    method = get_method("flexlora", dtype=torch.float64)
    state = method.aggregate(updates)
    w = [state.weights[u.client_id] for u in updates]
    ranks = {n: [4, 16] for n in shapes}
    fast = aggregation_report(state, updates, w, ranks, exact=True)
    full = aggregation_report(state, updates, w, ranks, exact=False)
    for n in shapes:
        assert fast[n]["rel_error_method"] == "probe-16" and full[n]["rel_error_method"] == "exact"
        assert fast[n]["rel_error_vs_exact"] < 1e-12 and full[n]["rel_error_vs_exact"] < 1e-12
        assert fast[n]["global_norm"] == pytest.approx(full[n]["global_norm"], rel=1e-12)
        for r in ("4", "16"):
            assert fast[n]["share_error"][r] == pytest.approx(full[n]["share_error"][r], rel=1e-9, abs=1e-12)
    broken = ServerState(state.method, state.round, {n: type(gm)(A=gm.A, B=gm.B * 1.1, spectrum=None) for n, gm in state.adapter.items()}, weights=state.weights)
    assert all(0.05 < e["rel_error_vs_exact"] < 0.15 for e in aggregation_report(broken, updates, w, ranks, exact=True).values())


# -- on a GPU (scripts/gpu_check.py runs these) ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["factored", "dense"])
def test_svd_paths_on_cuda_equal_the_cpu_reference(path):
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(512, r, generator=g, dtype=torch.float64) for r in (8, 30, 200)]
    As = [torch.randn(r, 384, generator=g, dtype=torch.float64) for r in (8, 30, 200)]
    coeffs = [0.2, 0.3, 0.5]
    ref = sum(c * B @ A for c, B, A in zip(coeffs, Bs, As))
    svd = svd_of_sum([B.cuda() for B in Bs], [A.cuda() for A in As], coeffs, path=path, dtype=torch.float64)
    assert svd.U.is_cuda and svd.path == path
    assert torch.allclose(svd.reconstruct().cpu(), ref, atol=1e-9 * float(ref.abs().max()))
    assert torch.allclose(svd.S.cpu(), torch.linalg.svdvals(ref)[: svd.S.numel()], rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_aggregation_on_cuda_returns_a_cpu_state_equal_to_the_cpu_one():
    shapes = {"a": (256, 192), "b": (128, 256)}
    updates = _updates(shapes, [8, 30, 200], seed=2)
    cpu = get_method("flexlora", dtype=torch.float64).aggregate(updates)
    gpu = get_method("flexlora", dtype=torch.float64, device="cuda").aggregate(updates)
    for n in shapes:
        assert gpu.adapter[n].A.device.type == "cpu"
        assert torch.allclose(gpu.adapter[n].delta(), cpu.adapter[n].delta(), atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_local_training_on_cuda_matches_the_cpu(tiny_model, tiny_tokenizer):
    import copy

    from flexlora.data.types import ClientData, Example

    client = ClientData(client_id=0, category="test", eval=[], train=[Example(instruction=f"Say {w}.", input="", output=f"{w} {w}.") for w in ("one", "two", "three", "four")])
    spec = {f"model.layers.{i}.mlp.down_proj": ModuleSpec(rank=8, alpha=16.0) for i in range(2)}
    share = {n: LoraFactors(A=torch.randn(8, 128, generator=torch.Generator().manual_seed(1)) * 0.1, B=torch.zeros(64, 8), scale=2.0) for n in spec}
    cfg = TrainConfig(max_steps=3, batch_size=2, lora_dropout=0.0)
    cpu = LocalTrainer(copy.deepcopy(tiny_model), tiny_tokenizer, ["down_proj"], cfg).train_client(client, spec, share, seed=0)
    gpu = LocalTrainer(copy.deepcopy(tiny_model).cuda(), tiny_tokenizer, ["down_proj"], cfg).train_client(client, spec, share, seed=0)
    for n in spec:
        assert gpu.update.modules[n].B.device.type == "cpu"
        assert torch.allclose(gpu.update.modules[n].B, cpu.update.modules[n].B, atol=1e-4, rtol=1e-3)
    assert gpu.metrics["loss_first"] == pytest.approx(cpu.metrics["loss_first"], rel=1e-4)
