"""Base-model identity: spelling set aside, layers and shapes decide, an explicit override for names,
and adapters whose initialisation changed the base weights refused. Plus what aggregate reports."""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from flexlora.cli import main

from tiny import make_peft_adapter, tiny_llama

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


def _save(model, path, seed, **lora):
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(path))
    return path


def _aggregate(paths, out, *extra):
    return main(["aggregate", *map(str, paths), "--method", "flexlora", "--out", str(out), *extra])


def test_the_same_base_path_spelled_differently_is_accepted(tmp_path, monkeypatch, capsys):
    (tmp_path / "models" / "llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spellings = ["models/llama", f"{tmp_path}/models/llama/", "./models/llama"]
    paths = [make_peft_adapter(tmp_path / f"a{i}", seed=i, base_name=name) for i, name in enumerate(spellings)]
    assert _aggregate(paths, tmp_path / "out") == 0, capsys.readouterr().err
    # made elsewhere: a relative path that an absolute one ends with
    paths = [make_peft_adapter(tmp_path / f"b{i}", seed=i, base_name=name) for i, name in enumerate(["weights/llama-7b", "/srv/weights/llama-7b/"])]
    assert _aggregate(paths, tmp_path / "out2") == 0, capsys.readouterr().err


def test_different_base_names_are_refused_unless_allowed(tmp_path, capsys):
    paths = [make_peft_adapter(tmp_path / "a", seed=1, base_name="org/model-a"), make_peft_adapter(tmp_path / "b", seed=2, base_name="org/model-b")]
    assert _aggregate(paths, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "base model 'org/model-b' differs from 'org/model-a'" in err and "--allow-different-base" in err and str(tmp_path / "a") in err
    assert _aggregate(paths, tmp_path / "out", "--allow-different-base") == 0
    assert "inputs name different base models" in capsys.readouterr().out


def test_unnamed_adapters_of_different_models_are_refused_by_layers_and_shapes(tmp_path, capsys):
    llama = _save(tiny_llama(0), tmp_path / "llama", 1, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    wide = _save(wider, tmp_path / "wide", 2, target_modules=["q_proj", "v_proj"])
    gpt2 = _save(GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4)), tmp_path / "gpt2", 3, target_modules=["c_attn"], fan_in_fan_out=True)
    for path in (llama, wide, gpt2):
        assert not json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    assert _aggregate([llama, wide], tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert "were made for different models" in err and "32x32" in err and "48x48" in err and str(llama) in err and str(wide) in err
    assert _aggregate([llama, gpt2], tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "adapt different layers" in err and str(gpt2) in err
    assert _aggregate([llama, gpt2], tmp_path / "o3", "--allow-different-base") == 2  # the override is for names, never for shapes


def test_pissa_adapters_are_refused_until_converted_back_to_plain_lora(tmp_path, capsys):
    def pissa(i):
        peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", lora_dropout=0.0))
        peft_model.save_pretrained(str(tmp_path / f"init{i}"))  # PEFT's recipe: the initial adapter, then the trained one
        cfg = json.loads((tmp_path / f"init{i}" / "adapter_config.json").read_text())
        (tmp_path / f"init{i}" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": True}))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01 * (i + 1))
        peft_model.save_pretrained(str(tmp_path / f"raw{i}"))
        peft_model.save_pretrained(str(tmp_path / f"plain{i}"), path_initial_model_for_weight_conversion=str(tmp_path / f"init{i}"))

    pissa(0), pissa(1)
    assert _aggregate([tmp_path / "raw0", tmp_path / "raw1"], tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert "init_lora_weights = 'pissa' changed the base model's weights" in err and "path_initial_model_for_weight_conversion" in err
    assert _aggregate([tmp_path / "plain0", tmp_path / "plain1"], tmp_path / "o2") == 0, capsys.readouterr().err


def test_flora_says_what_to_merge_and_refusals_name_input_folders(tmp_path, capsys):
    paths = [make_peft_adapter(tmp_path / "small", seed=1, r=2), make_peft_adapter(tmp_path / "large", seed=2, r=4)]
    assert main(["aggregate", *map(str, paths), "--method", "flora", "--out", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert f"merge {tmp_path / 'f' / 'global'} into the base model" in out and "B = 0" in out
    assert main(["aggregate", *map(str, paths), "--method", "fedavg", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert f"rank 2 for {tmp_path / 'small'} and 4 for {tmp_path / 'large'}" in err and "client 0" not in err


def test_summary_names_a_custom_distribution_as_custom(tmp_path):
    out = tmp_path / "run"
    sets = ["--set", "federation.rounds=1", "--set", "train.max_steps=1", "--set", "eval.at_start=false", "--set", "eval.clients=0",
            "--set", "federation.clients_per_round=2", "--set", "resources.custom_distribution={type1 = 0.5, type2 = 0.5}"]
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", *sets]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distribution"] == "custom" and summary["custom_distribution"] == {"type1": 0.5, "type2": 0.5}
    assert set(summary["type_counts"]) <= {"type1", "type2"}
