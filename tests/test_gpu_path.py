"""The library in the precisions a GPU uses by default (bfloat16 bases), and the GPU path's guards,
checked on the CPU: SLoRA's float32 master weights, exact merges and evaluation over a bfloat16
base, ``dtype = "auto"`` on devices without native bfloat16, out-of-memory in attach and in a SLoRA
client, ``train.deterministic``, the tomllib fallback, and gpu_check's accounting of skipped parts."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from flexlora.cli import main
from flexlora.config import TrainConfig, load_config
from flexlora.data.types import ClientData, Example
from flexlora.models import resolve_model_dtype
from flexlora.simulate import Simulation
from flexlora.train import (
    ClientOutOfMemory,
    LocalTrainer,
    apply_dense_delta,
    labelled_token_loss,
    use_deterministic_kernels,
)
from flexlora.slora import sparse_mask, train_client_sparse
from flexlora.update import GlobalModule, LoraFactors, ModuleSpec, ServerState

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
TARGETS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]


def _client(n: int = 6) -> ClientData:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    return ClientData(client_id=0, category="t", eval=[], train=[Example(f"Say {w}.", "", f"{w} {w} {w}.") for w in words[:n]])


def _lora_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A")]


# -- dtype auto --------------------------------------------------------------------------------------
def test_auto_dtype_is_bfloat16_only_where_the_chosen_cuda_device_has_it_natively(monkeypatch):
    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (8, 0), 1: (7, 0)}[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a V100 / T4 reports (emulation)
    assert resolve_model_dtype("auto", torch.device("cuda", 1)) == torch.float32  # capability 7.0: no native bfloat16
    assert resolve_model_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert [torch.device(d).index for d in asked] == [1, 0]  # the configured device, not the current one
    assert resolve_model_dtype("auto", torch.device("cpu")) == torch.float32


# -- exact merges and evaluation over a bfloat16 base ----------------------------------------------------
def test_a_bfloat16_merge_is_w0_plus_delta_in_float32_and_undoes_bit_exactly(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    g = torch.Generator().manual_seed(0)
    # entries ~1e-4: below half of bfloat16's spacing at most weights (|w| ~ 0.2), so a bfloat16 merge loses them
    deltas = {n: torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g) * 5e-5 for n in TARGETS}
    apply_dense_delta(model, deltas, originals)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    for n in TARGETS:
        layer = model.get_submodule(n)
        exact = originals[n].float() + deltas[n]
        assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, exact)
        out = layer(x)
        assert out.dtype == torch.bfloat16  # the rest of the model still sees its own dtype
        torch.testing.assert_close(out, (x.float() @ exact.T).to(torch.bfloat16), rtol=0, atol=0)
        lost = (originals[n].float() + deltas[n]).to(torch.bfloat16).float() - originals[n].float()
        assert (lost == 0).float().mean() > 0.5  # what the old bfloat16 merge kept of the update: mostly nothing
    apply_dense_delta(model, {}, originals)
    for n in TARGETS:
        layer = model.get_submodule(n)
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, originals[n])
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_evaluating_a_bfloat16_base_with_an_update_matches_the_float32_model_within_bfloat16_rounding(monkeypatch, tmp_path):
    """The evaluated model is W0 + dW: the bfloat16 base untouched, the update attached as float32 factors
    that multiply to dW exactly. Tolerance: logits of a 2-layer model computed in bfloat16 carry a relative
    error of a few times bfloat16's unit roundoff 2^-8 = 0.0039 per layer; 0.05 of the logits' scale bounds
    that with room, and is far below what the update changes (asserted > 0.2 of that scale)."""
    probes = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    seen = {}

    def probe_eval(model, tokenizer, clients, ecfg, progress=True):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        seen["logits"] = model(input_ids=probes).logits.float()
        seen["factors"] = {n: (m.lora_B["default"].weight @ m.lora_A["default"].weight) * m.scaling["default"] for n, m in base.named_modules() if hasattr(m, "lora_A")}

        class Result:
            def to_dict(self):
                return {}

        return Result()

    monkeypatch.setattr("flexlora.runner.evaluate_clients", probe_eval)
    g = torch.Generator().manual_seed(1)
    logits = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(SMOKE, ["federation.rounds=1", f'model.dtype="{dtype}"'])
        sim = Simulation(cfg, tmp_path / dtype, progress=False)
        if dtype == "float32":
            state = ServerState(method="flexlora", round=1, adapter={n: GlobalModule(A=torch.randn(8, s[1], generator=g) * 0.3, B=torch.randn(s[0], 8, generator=g) * 0.3) for n, s in sim.server.fed.shapes.items()})
            sim.server.evaluate(ServerState(method="flexlora", round=0, adapter={}))
            logits["f32 base"] = seen["logits"]
        before = {n: sim.server.model.get_submodule(n).weight.detach().clone() for n in sim.server.fed.shapes}
        sim.server.evaluate(state)
        logits[dtype] = seen["logits"]
        if dtype == "bfloat16":
            for n, gm in state.adapter.items():
                assert seen["factors"][n].dtype == torch.float32
                torch.testing.assert_close(seen["factors"][n], gm.B @ gm.A, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(sim.server.model.get_submodule(n).weight, w) for n, w in before.items())  # base untouched after
        assert not _lora_layers(sim.server.model)
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() < 0.05 * scale
    assert (logits["float32"] - logits["f32 base"]).abs().max() > 0.2 * scale  # the update matters at this tolerance


# -- SLoRA stage 1 in bfloat16 --------------------------------------------------------------------------
def test_slora_stage_one_changes_a_bfloat16_models_weights_and_lowers_its_loss(tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    client = _client()
    masks = {n: sparse_mask((64, 64), 0.25, seed=i) for i, n in enumerate(TARGETS)}
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    cfg = TrainConfig(lr=5e-5, local_epochs=6, batch_size=6, lora_dropout=0.0, max_length=64)  # SLoRA's stage-1 rate
    res = train_client_sparse(model, tiny_tokenizer, client, masks, cfg, seed=0)
    moved = sum(int((res.deltas[n] != 0).sum()) for n in TARGETS) / sum(int(m.sum()) for m in masks.values())
    assert moved > 0.9, f"only {moved:.0%} of the trained entries moved (bfloat16 rounding ate the steps)"
    assert all(bool((res.deltas[n][~masks[n]] == 0).all()) for n in TARGETS)
    for n in TARGETS:  # the shared model is back as it was, in its own dtype
        assert model.get_submodule(n).weight.dtype == torch.bfloat16 and torch.equal(model.get_submodule(n).weight, originals[n])

    from flexlora.train import _MicroBatch, tokenize_client  # noqa: PLC0415 - the loss the trainer computes

    batch = _MicroBatch(tokenize_client(tiny_tokenizer, client, cfg), tiny_tokenizer.pad_token_id, torch.device("cpu")).batch

    def loss() -> float:
        with torch.no_grad():
            total, count = labelled_token_loss(model, batch)
        return float(total) / count

    before = loss()
    apply_dense_delta(model, res.deltas, originals)  # what the round merges (in float32 beside the base)
    assert loss() < before
    assert res.metrics["loss_last"] < res.metrics["loss_first"]


# -- out of memory --------------------------------------------------------------------------------------
def test_out_of_memory_while_attaching_leaves_no_lora_layers_on_the_shared_model(tiny_model, tiny_tokenizer, monkeypatch):
    model = copy.deepcopy(tiny_model)
    trainer = LocalTrainer(model, tiny_tokenizer, ["q_proj", "o_proj"], TrainConfig(max_steps=1, batch_size=2))
    real_attach = LocalTrainer.attach

    def attach_then_fail(self, spec):
        real_attach(self, spec)  # the layers are injected, the PeftModel is lost
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LocalTrainer, "attach", attach_then_fail)
    spec = {n: ModuleSpec(rank=2, alpha=4.0) for n in TARGETS}
    share = {n: LoraFactors(A=torch.zeros(2, 64), B=torch.zeros(64, 2), scale=2.0) for n in TARGETS}
    with pytest.raises(ClientOutOfMemory, match="ran out of accelerator memory"):
        trainer.train_client(_client(2), spec, share, seed=0)
    assert not _lora_layers(trainer.model) and "peft_config" not in trainer.model.__dict__
    monkeypatch.setattr(LocalTrainer, "attach", real_attach)
    assert trainer.train_client(_client(2), spec, share, seed=0).metrics["steps"] == 1  # the next client trains


def test_a_slora_client_that_runs_out_of_memory_is_dropped_and_the_round_goes_on(tmp_path, monkeypatch):
    import flexlora.train as train

    cfg = load_config(SMOKE, ["federation.algorithm=\"slora\"", "federation.slora_rounds=1", "federation.rounds=2", "federation.clients_per_round=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"])
    sim = Simulation(cfg, tmp_path, progress=False)
    real_loss, calls = train.labelled_token_loss, []

    def loss_or_oom(model, batch):
        calls.append(1)
        if len(calls) == 1:  # the first client, in its first forward pass: weights held, hooks on
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_loss(model, batch)

    monkeypatch.setattr(train, "labelled_token_loss", loss_or_oom)
    sim.run()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    status = [c["status"] for c in first["clients"]]
    assert sorted(status) == ["ok", "oom"] and first["stage"] == "slora-sparse"
    assert "ran out of accelerator memory" in next(iter(first["dropped"].values()))[0]
    for n, w in sim.server.originals.items():  # stage 1 over: the base is the original one again
        assert torch.equal(sim.server.model.get_submodule(n).weight, w) and not sim.server.model.get_submodule(n).weight.requires_grad


# -- determinism, config ----------------------------------------------------------------------------------
@pytest.fixture
def torch_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
    torch.backends.cuda.enable_flash_sdp(saved[3])
    torch.backends.cuda.enable_mem_efficient_sdp(saved[4])


def test_train_deterministic_sets_the_torch_switches(torch_switches, tmp_path):
    import os

    cfg = load_config(SMOKE, ["train.deterministic=true"])
    assert cfg.train.deterministic is True
    assert not torch.are_deterministic_algorithms_enabled()
    Simulation(cfg, tmp_path, progress=False)  # a run switches them on before its model loads
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    use_deterministic_kernels()  # idempotent


def test_float16_training_is_refused_before_any_work(tmp_path, capsys):
    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "x"), "--quiet", "--set", 'model.dtype="float16"']) == 2
    err = capsys.readouterr().err
    assert "model.dtype: float16" in err and "loss scaling" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_config_reads_toml_without_tomllib(monkeypatch):
    """Python 3.10 has no tomllib: the config module falls back to tomli (a dependency there)."""
    pytest.importorskip("tomli")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib -> ModuleNotFoundError
    spec = importlib.util.spec_from_file_location("flexlora_config_py310", ROOT / "src" / "flexlora" / "config.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.tomllib.__name__ == "tomli"
    assert module.load_config(SMOKE).federation.rounds == 2


# -- gpu_check's bookkeeping -----------------------------------------------------------------------------
def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_reports_skipped_parts_as_not_measured():
    gc = _gpu_check()
    assert gc.verdict([]) == "not measured"
    assert gc.verdict([{"skipped": "time budget"}]) == "not measured"
    assert gc.verdict([{"passed": True}, {"skipped": "time budget"}]) == "incomplete"
    assert gc.verdict([{"passed": True}, {"error": "RuntimeError: x", "passed": False}]) == "failed"
    assert gc.verdict([{"passed": True}, {"passed": True}]) == "passed"
    result = {"parts": {"tests": {"status": "passed"}, "training": {"status": "not measured"}}}
    assert gc.overall(result) == "incomplete" and gc.overall({"parts": {}}) == "not measured"
    assert gc.overall({"parts": {"tests": {"status": "passed"}, "federated": {"status": "failed"}}}) == "failed"
