"""Any causal LM PEFT supports: GPT-2's Conv1D, OPT / Falcon / Phi / Gemma naming, "all-linear",
module groups from the architecture (or lora.groups), and a run that says what it trains."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from flexlora.config import ConfigError, TrainConfig, load_config
from flexlora.resources import ResourceError, module_group, target_module_names
from flexlora.simulate import Simulation
from flexlora.data.types import ClientData, Example
from flexlora.slora import sparse_mask, train_client_sparse
from flexlora.train import apply_dense_delta

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


SMALL = dict(vocab_size=96)


def gpt2(vocab_size: int = 96, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=4, **kw)).eval()


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return gpt2()
    if family == "opt":
        return OPTForCausalLM(OPTConfig(**SMALL, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    if family == "falcon":
        return FalconForCausalLM(FalconConfig(**SMALL, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False))
    if family == "phi":
        return PhiForCausalLM(PhiConfig(**SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4))
    if family == "gemma":
        return GemmaForCausalLM(GemmaConfig(**SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8))
    raise AssertionError(family)


# (family, layers per block in group attention, in group mlp)
FAMILIES = [("gpt2", 2, 2), ("opt", 4, 2), ("falcon", 2, 2), ("phi", 4, 2), ("gemma", 4, 3)]


@pytest.mark.parametrize(("family", "n_attention", "n_mlp"), FAMILIES)
def test_all_linear_layers_of_each_family_fall_into_attention_and_mlp(family, n_attention, n_mlp):
    model = tiny(family)
    shapes = target_module_names(model, "all-linear")
    assert not any(n.endswith("lm_head") for n in shapes)
    groups = [module_group(n) for n in shapes]
    assert groups.count("attention") == 2 * n_attention and groups.count("mlp") == 2 * n_mlp, dict(zip(shapes, groups))


def test_gpt2_conv1d_layers_have_their_real_shapes_and_ambiguous_names_follow_their_block():
    model = gpt2()
    shapes = target_module_names(model, ["c_attn", "c_proj", "c_fc"])
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32)  # (d_out, d_in): Conv1D stores (d_in, d_out)
    assert shapes["transformer.h.0.mlp.c_fc"] == (128, 32) and shapes["transformer.h.0.mlp.c_proj"] == (32, 128)
    assert module_group("transformer.h.0.attn.c_proj") == "attention" and module_group("transformer.h.0.mlp.c_proj") == "mlp"
    # explicit lora.groups win, the longest matching entry first
    assert module_group("transformer.h.0.mlp.c_proj", {"attention": ["c_proj"], "mlp": ["mlp.c_proj"]}) == "mlp"


def test_default_targets_on_gpt2_name_its_layers_and_all_linear():
    with pytest.raises(ResourceError, match=r"names no linear layer of this model; its layers are named \['c_attn', 'c_proj', 'c_fc'\].*all-linear"):
        target_module_names(gpt2(), ["q_proj", "v_proj"])


def test_a_layer_of_unknown_group_names_the_config_key():
    with pytest.raises(ResourceError, match=r"is in no module group.*set lora.groups.*\"wi\""):
        module_group("encoder.block.0.layer.1.DenseReluDense.wi")
    assert module_group("encoder.block.0.layer.1.DenseReluDense.wi", {"mlp": ["wi"]}) == "mlp"


def test_lora_targets_accepts_all_linear_and_refuses_other_strings():
    assert load_config(SMOKE, ['lora.targets="all-linear"']).lora.targets == "all-linear"
    with pytest.raises(ConfigError, match="lora.targets: 'q_proj' is neither"):
        load_config(SMOKE, ['lora.targets="q_proj"'])


def test_conv1d_update_is_merged_as_peft_merges_it():
    """A PEFT adapter on GPT-2 (fan_in_fan_out) merged by PEFT equals W0 + (scale B A) applied by us,
    also on the square attention c_proj where a missing transpose would go unnoticed by shapes."""
    model = gpt2()
    names = list(target_module_names(model, "all-linear"))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    deltas = {}
    for n in names:
        layer = peft_model.get_base_model().get_submodule(n)
        deltas[n] = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    merged = peft_model.merge_and_unload()
    ours = copy.deepcopy(model)
    apply_dense_delta(ours, deltas, {n: ours.get_submodule(n).weight.detach().clone() for n in names})
    for n in names:
        torch.testing.assert_close(ours.get_submodule(n).weight, merged.get_submodule(n).weight)


def test_sparse_warmup_on_conv1d_returns_updates_in_the_lora_layout(tiny_tokenizer):
    model = gpt2(len(tiny_tokenizer))
    shapes = target_module_names(model, "all-linear")
    masks = {n: sparse_mask(s, 0.3, i) for i, (n, s) in enumerate(shapes.items())}
    client = ClientData(0, "c", [Example("Say hi.", "", "hi")] * 4, [])
    res = train_client_sparse(model, tiny_tokenizer, client, masks, TrainConfig(lr=1e-2, max_steps=1, batch_size=2, max_length=32), seed=0)
    for n, d in res.deltas.items():
        assert tuple(d.shape) == shapes[n] and bool((d[~masks[n]] == 0).all()) and bool(d.abs().sum() > 0)


def test_a_gpt2_run_trains_conv1d_layers_says_what_it_trains_and_writes_a_peft_loadable_adapter(tiny_tokenizer, tmp_path, capsys):
    model = gpt2(len(tiny_tokenizer))
    cfg = load_config(SMOKE, ['lora.targets="all-linear"', "federation.rounds=1", "train.max_steps=1", "eval.at_start=false", "federation.clients_per_round=3"])
    sim = Simulation(cfg, tmp_path / "run", model=model, tokenizer=tiny_tokenizer, progress=False)
    summary = sim.run()
    err = capsys.readouterr().err
    assert "trains 8 layers (lora.targets = all-linear): attention: attn.c_proj, c_attn; mlp: c_fc, mlp.c_proj" in err
    assert "ranks (attention / mlp) per resource type: type1 2 / 2" in err
    assert summary["modules"]["groups"] == {"attention": ["attn.c_proj", "c_attn"], "mlp": ["c_fc", "mlp.c_proj"]}
    assert summary["rouge_l_weighted"] is not None
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["aggregation"]["max_rel_error_vs_exact"] < 1e-5
    # the global adapter loads into GPT-2 with PEFT and merges to exactly the run's global model
    sim.server.restore_base()
    base = copy.deepcopy(sim.server.model)
    config = json.loads((tmp_path / "run" / "final" / "global" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "run" / "final" / "global")).merge_and_unload()
    from flexlora.checkpoint import load_checkpoint, state_from_dict

    ckpt = load_checkpoint(tmp_path / "run")
    deltas = sim.server.global_deltas(state_from_dict(ckpt["state"]))
    ours = copy.deepcopy(base)
    apply_dense_delta(ours, deltas, {n: ours.get_submodule(n).weight.detach().clone() for n in deltas})
    for n in deltas:
        torch.testing.assert_close(merged.get_submodule(n).weight, ours.get_submodule(n).weight, atol=1e-5, rtol=1e-4)


def test_opt_with_default_targets_says_which_names_train_nothing(tiny_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32)).eval()
    cfg = load_config(SMOKE, ["federation.rounds=1", "train.max_steps=1", "eval.at_start=false", "federation.clients_per_round=2", "eval.clients=0"])
    Simulation(cfg, tmp_path / "run", model=model, tokenizer=tiny_tokenizer, progress=False).run()
    err = capsys.readouterr().err
    assert "trains 6 layers" in err and "attention: k_proj, q_proj, v_proj" in err
    assert "lora.targets names no layer of this model: o_proj, gate_proj, up_proj, down_proj" in err
    assert "nothing will be evaluated (Rouge-L stays empty): eval.clients = 0" in err
