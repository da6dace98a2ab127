import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from flexlora.methods import FlexLoRA
from flexlora.peft_io import AdapterError, read_adapter, write_adapter
from flexlora.update import ModuleSpec

from tiny import make_peft_adapter, tiny_llama


def test_read_recovers_per_module_ranks_and_alphas(tmp_path):
    path = make_peft_adapter(tmp_path / "a", seed=1, r=4, rank_pattern={"down_proj": 8}, alpha_pattern={"q_proj": 32})
    a = read_adapter(path)
    assert len(a.modules) == 2 * 7
    down = a.specs["model.layers.0.mlp.down_proj"]
    q = a.specs["model.layers.1.self_attn.q_proj"]
    assert (down.rank, down.alpha) == (8, 16.0)
    assert (q.rank, q.alpha) == (4, 32.0)
    assert a.modules["model.layers.1.self_attn.q_proj"].scale == 8.0
    assert a.base_model == "tiny-llama"


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    a = read_adapter(make_peft_adapter(tmp_path / "a", seed=1, r=4, rslora=True))
    assert a.modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / 2)


def test_round_trip_is_bit_exact_and_loads_in_peft(tmp_path):
    src = make_peft_adapter(tmp_path / "src", seed=2, r=4, rank_pattern={"gate_proj": 6, "up_proj": 6}, alpha_pattern={"v_proj": 8})
    a = read_adapter(src)
    out = write_adapter(tmp_path / "out", a.modules, a.specs, template=a.config)
    before, after = load_file(str(src / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    b = read_adapter(out)
    assert b.specs == a.specs

    x = torch.randint(0, 128, (2, 9))
    m1 = PeftModel.from_pretrained(tiny_llama(0), str(src)).eval()
    m2 = PeftModel.from_pretrained(tiny_llama(0), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(m1(x).logits, m2(x).logits, rtol=0, atol=0)
        assert not torch.allclose(m1(x).logits, tiny_llama(0)(x).logits)  # the adapter does something


def test_share_written_as_adapter_reproduces_the_aggregate_in_peft(tmp_path):
    """The PEFT model loaded from a full-rank FlexLoRA share computes base + dW exactly."""
    a1 = read_adapter(make_peft_adapter(tmp_path / "a1", seed=3, r=2))
    a2 = read_adapter(make_peft_adapter(tmp_path / "a2", seed=4, r=4, rank_pattern={"down_proj": 6}))
    method = FlexLoRA(dtype=torch.float64)
    state = method.aggregate([a1.to_update("a1", 10), a2.to_update("a2", 30)])
    spec = {n: ModuleSpec(rank=min(gm.d_out, gm.d_in), alpha=16.0) for n, gm in state.adapter.items()}
    share = method.share_for(state, spec)
    write_adapter(tmp_path / "full", share, spec, template=a1.config, dtype=torch.float64)
    model = PeftModel.from_pretrained(tiny_llama(0).double(), str(tmp_path / "full")).eval()
    merged = model.merge_and_unload()
    base = dict(tiny_llama(0).double().named_parameters())
    for name, gm in state.adapter.items():
        w = dict(merged.named_parameters())[f"{name}.weight"]
        expected = base[f"{name}.weight"] + 0.25 * a1.modules[name].delta() + 0.75 * a2.modules[name].delta()
        torch.testing.assert_close(w, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json: missing"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:100]), "unreadable safetensors"),
        (lambda p: _edit_config(p, r=5), "config declares rank 5 but the weights have rank 4"),
        (lambda p: _edit_config(p, peft_type="IA3"), "only LORA adapters"),
        (lambda p: _edit_config(p, use_dora=True), "DoRA"),
        (lambda p: _edit_tensors(p, lambda t: {k: (v * float("nan") if "q_proj.lora_A" in k else v) for k, v in t.items()}), "q_proj: contains NaN"),
        (lambda p: _edit_tensors(p, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj.lora_B" not in k}), "layers.1.mlp.up_proj: has lora_A but not both"),
    ],
)
def test_broken_adapters_give_errors_naming_the_file(tmp_path, breakage, message):
    path = make_peft_adapter(tmp_path / "a", seed=5, r=4)
    breakage(path)
    with pytest.raises(AdapterError, match=message) as info:
        read_adapter(path)
    assert str(path) in str(info.value)


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.torch import save_file

    t = load_file(str(path / "adapter_model.safetensors"))
    save_file(fn(t), str(path / "adapter_model.safetensors"))
