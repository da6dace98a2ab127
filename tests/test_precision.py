"""bf16 autocast on the CPU (train.precision, eval.precision): detection, what "auto" means, the float32
path unchanged, autocast actually on, training under it, and everything that leaves a client float32."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexlora import precision as precision_module
from flexlora.cli import main
from flexlora.config import ConfigError, EvalConfig, TrainConfig, load_config
from flexlora.data.types import ClientData, Example
from flexlora.evaluate import teacher_forced
from flexlora.precision import cpu_has_native_bf16, pass_precision, resolve_precision
from flexlora.train import LocalTrainer
from flexlora.update import LoraFactors, ModuleSpec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
WORDS = ("one", "two", "three", "four")
CLIENT = ClientData(client_id=0, category="test", eval=[], train=[Example(instruction=f"Say {w}.", input="", output=f"{w} {w} {w}.") for w in WORDS])
SPEC = {f"model.layers.{i}.{m}": ModuleSpec(rank=4, alpha=8.0) for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}


def _share() -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(1)
    widths = {"self_attn.q_proj": (64, 64), "mlp.down_proj": (64, 128)}
    out = {}
    for name in SPEC:
        d_out, d_in = widths[name.split(".", 3)[-1]]
        out[name] = LoraFactors(A=torch.randn(4, d_in, generator=g) * 0.1, B=torch.zeros(d_out, 4), scale=2.0)
    return out


def _train(model, tokenizer, precision: str, steps: int = 2, lr: float = 2e-4, batch_size: int = 2):
    cfg = TrainConfig(max_steps=steps, local_epochs=steps, batch_size=batch_size, lora_dropout=0.0, lr=lr, precision=precision)
    return LocalTrainer(copy.deepcopy(model), tokenizer, ["q_proj", "down_proj"], cfg).train_client(CLIENT, SPEC, _share(), seed=3)


def _same_bytes(a, b) -> bool:
    return all(torch.equal(a.update.modules[n].A, b.update.modules[n].A) and torch.equal(a.update.modules[n].B, b.update.modules[n].B) for n in SPEC)


def _no_bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)


def _bf16(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)


def test_detection_reads_the_cpu_flags_and_auto_follows_it(monkeypatch):
    flags = torch.cpu.get_capabilities()
    assert cpu_has_native_bf16() == any(flags.get(f, False) for f in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    _bf16(monkeypatch)
    assert resolve_precision("auto", "cpu") == "bf16-autocast"
    assert resolve_precision("auto", "meta") == "float32"  # not a CPU: model.dtype decides there
    _no_bf16(monkeypatch)
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("bf16-autocast", "cpu") == "bf16-autocast"  # asked for explicitly: done anyway
    assert resolve_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("bf16", "cpu")


def test_the_proc_cpuinfo_fallback_reads_the_flags(monkeypatch, tmp_path):
    """Without torch's capability query, the flags line of /proc/cpuinfo decides."""
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    real_open = open
    for flags, expected in (("fpu avx2 avx512f avx512bw", False), ("fpu avx2 avx512_bf16", True), ("fp asimd bf16 i8mm", True)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k))
        cpu_has_native_bf16.cache_clear()
        try:
            assert cpu_has_native_bf16() is expected
        finally:
            cpu_has_native_bf16.cache_clear()


def _autocast_seen(model, tokenizer, precision: str) -> set[tuple[bool, torch.dtype]]:
    """(autocast on?, output dtype) of one base linear layer over a short training."""
    seen: set[tuple[bool, torch.dtype]] = set()
    model = copy.deepcopy(model)
    layer = model.model.layers[0].mlp.up_proj  # not a LoRA target: a plain frozen linear layer
    layer.register_forward_hook(lambda mod, args, out: seen.add((torch.is_autocast_enabled("cpu"), out.dtype)))
    LocalTrainer(model, tokenizer, ["q_proj", "down_proj"], TrainConfig(max_steps=1, batch_size=2, precision=precision)).train_client(CLIENT, SPEC, _share(), seed=0)
    return seen


def test_float32_is_the_plain_path_and_auto_without_bf16_is_float32(tiny_model, tiny_tokenizer, monkeypatch):
    """"float32" runs no autocast at all and gives the same bytes as the loop without the wrapper
    (the code before precision existed); "auto" on a CPU without native bf16 gives those bytes too."""
    assert _autocast_seen(tiny_model, tiny_tokenizer, "float32") == {(False, torch.float32)}
    assert _autocast_seen(tiny_model, tiny_tokenizer, "bf16-autocast") == {(True, torch.bfloat16)}
    plain = _train(tiny_model, tiny_tokenizer, "float32")
    assert plain.metrics["precision"] == "float32"
    import contextlib

    import flexlora.train

    with monkeypatch.context() as m:  # the loop exactly as it was: no context manager around the forward pass
        m.setattr(flexlora.train, "autocast_for", lambda *a: contextlib.nullcontext())
        before = _train(tiny_model, tiny_tokenizer, "float32")
    assert _same_bytes(plain, before) and plain.metrics["loss_first"] == before.metrics["loss_first"]
    _no_bf16(monkeypatch)
    auto = _train(tiny_model, tiny_tokenizer, "auto")
    assert auto.metrics["precision"] == "float32" and _same_bytes(plain, auto)


def test_bf16_autocast_trains_and_everything_that_leaves_the_client_is_float32(tiny_model, tiny_tokenizer, monkeypatch):
    states = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            states.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    _bf16(monkeypatch)
    fast = _train(tiny_model, tiny_tokenizer, "auto", steps=8, lr=1e-2, batch_size=4)  # the same batch every step
    assert fast.metrics["precision"] == "bf16-autocast"
    assert fast.metrics["loss_last"] < 0.8 * fast.metrics["loss_first"]  # it learns
    for f in fast.update.modules.values():
        assert f.A.dtype == f.B.dtype == torch.float32 and torch.isfinite(f.B).all()
    (opt,) = states[-1:]
    assert {t.dtype for s in opt.state.values() for t in s.values() if t.dim() > 0} == {torch.float32}
    assert {p.dtype for g in opt.param_groups for p in g["params"]} == {torch.float32}
    # close to the float32 update for the same batches, and not equal to it (autocast did run)
    exact = _train(tiny_model, tiny_tokenizer, "float32", steps=8, lr=1e-2, batch_size=4)
    for n in SPEC:
        a, b = fast.update.modules[n].delta(), exact.update.modules[n].delta()
        assert not torch.equal(a, b)
        assert float((a - b).norm() / b.norm()) < 0.2


def test_under_autocast_the_adapter_is_added_to_the_base_output_in_float32(tiny_model, tiny_tokenizer):
    """PEFT's base(x) + lora(x) in bfloat16 rounds a small adapter contribution away: the adapted layers
    give float32 outputs under bf16 autocast (and the hooks that do it leave with the adapter)."""
    model = copy.deepcopy(tiny_model)
    seen = []
    layer = model.model.layers[0].self_attn.q_proj  # an adapted layer: PEFT wraps it, the hook sees the wrapper's output
    trainer = LocalTrainer(model, tiny_tokenizer, ["q_proj", "down_proj"], TrainConfig(max_steps=1, batch_size=2, precision="bf16-autocast"))
    original_attach = trainer.attach

    def attach(spec):
        peft_model = original_attach(spec)
        peft_model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        return peft_model

    trainer.attach = attach
    trainer.train_client(CLIENT, SPEC, _share(), seed=0)
    assert seen and set(seen) == {torch.float32}
    assert type(trainer.model.model.layers[0].self_attn.q_proj) is type(layer) and not trainer.model.model.layers[0].self_attn.q_proj._forward_hooks


def test_eval_auto_uses_autocast_only_where_it_pays(tiny_model, tiny_tokenizer, monkeypatch):
    cpu = torch.device("cpu")
    _bf16(monkeypatch)
    auto = EvalConfig(precision="auto")
    from flexlora.precision import AUTO_BF16_PASSES

    assert {w: pass_precision(auto, cpu, w) for w in ("generation", "scoring")} == {w: "bf16-autocast" if w in AUTO_BF16_PASSES else "float32" for w in ("generation", "scoring")}
    assert {pass_precision(EvalConfig(precision="bf16-autocast"), cpu, w) for w in ("generation", "scoring")} == {"bf16-autocast"}
    assert {pass_precision(EvalConfig(precision="float32"), cpu, w) for w in ("generation", "scoring")} == {"float32"}
    _no_bf16(monkeypatch)
    assert {pass_precision(auto, cpu, w) for w in ("generation", "scoring")} == {"float32"}
    with pytest.raises(ValueError, match="precision"):
        EvalConfig(precision="bfloat16")
    examples = [Example(instruction=f"Say {w}.", input="", output=f"{w} {w}.") for w in WORDS]
    rows = {p: teacher_forced(tiny_model, tiny_tokenizer, examples, EvalConfig(precision=p, batch_size=4)) for p in ("float32", "bf16-autocast")}
    loss = {p: sum(r["loss_sum"] for r in rows[p]) / sum(r["num_tokens"] for r in rows[p]) for p in rows}
    assert loss["bf16-autocast"] != loss["float32"] and loss["bf16-autocast"] == pytest.approx(loss["float32"], rel=0.05)


@pytest.mark.parametrize("key", ["train.precision", "eval.precision"])
def test_an_unknown_precision_is_refused_naming_its_key(key, capsys, tmp_path):
    with pytest.raises(ConfigError, match=key.split(".")[0]):
        load_config(SMOKE, [f'{key}="bf16"'])
    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "x"), "--set", f'{key}="half"']) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_under_autocast_writes_float32_adapters_and_says_which_precision(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["federation.rounds=1", "federation.clients_per_round=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1",
            'train.precision="bf16-autocast"', 'eval.precision="bf16-autocast"', "eval.eval_loss=true"]
    assert main(["run", "--config", SMOKE, "--out", str(out), *sum((["--set", s] for s in sets), [])]) == 0
    assert "precision: training bf16-autocast; evaluation: generation bf16-autocast, scoring bf16-autocast" in capsys.readouterr().err
    (rec,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {c["precision"] for c in rec["clients"]} == {"bf16-autocast"}
    assert rec["eval"]["proxy_eval_loss"] > 0
    for sub in (out / "final").iterdir():
        assert {t.dtype for t in load_file(str(sub / "adapter_model.safetensors")).values()} == {torch.float32}


def test_resuming_a_checkpoint_from_before_the_option_is_a_change_where_auto_means_bf16(monkeypatch):
    """A run saved before train.precision existed trained in float32: "auto" resolving to bf16 here is a
    change for --resume (named), "float32" is not; a saved "auto" means what it means on this machine."""
    from flexlora.config import RunConfig, config_changes

    cfg = RunConfig()
    legacy = cfg.to_dict()
    del legacy["train"]["precision"], legacy["eval"]["precision"]
    _bf16(monkeypatch)
    assert config_changes(legacy, cfg) == ["train.precision: 'float32' -> 'bf16-autocast'"]  # eval's "auto" is float32 here
    cfg.train.precision = "float32"
    assert config_changes(legacy, cfg) == []
    assert config_changes(RunConfig().to_dict(), cfg) == ["train.precision: 'bf16-autocast' -> 'float32'"]
    cfg.eval.precision = "bf16-autocast"
    assert config_changes(legacy, cfg) == ["eval.precision: 'float32' -> 'bf16-autocast'"]
    cfg.eval.precision = "float32"
    _no_bf16(monkeypatch)
    assert config_changes(legacy, RunConfig()) == [] and config_changes(RunConfig().to_dict(), cfg) == []
