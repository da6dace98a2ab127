import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexlora.cli import main
from flexlora.peft_io import read_adapter

from tiny import make_peft_adapter


@pytest.fixture
def adapters(tmp_path):
    return [
        make_peft_adapter(tmp_path / "in" / "small", seed=1, r=2),
        make_peft_adapter(tmp_path / "in" / "mixed", seed=2, r=3, rank_pattern={"down_proj": 7, "up_proj": 7, "gate_proj": 7}),
        make_peft_adapter(tmp_path / "in" / "large", seed=3, r=6),
    ]


def test_aggregate_writes_a_share_per_input_and_a_report(tmp_path, adapters, capsys):
    out = tmp_path / "out"
    code = main(["aggregate", *map(str, adapters), "--method", "flexlora", "--out", str(out), "--weights", "10,20,70"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "flexlora"
    assert report["weights"] == pytest.approx({"small": 0.1, "mixed": 0.2, "large": 0.7})
    assert set(report["modules"]) == set(read_adapter(adapters[0]).modules)
    assert report["summary"]["rel_error_vs_exact"] < 1e-5
    for src in adapters:
        a, b = read_adapter(src), read_adapter(out / src.name)
        assert a.specs == b.specs  # same per-module ranks as that input
    g = read_adapter(out / "global")
    name = "model.layers.0.mlp.down_proj"
    exact = sum(w * read_adapter(p).modules[name].delta() for w, p in zip([0.1, 0.2, 0.7], adapters))
    torch.testing.assert_close(g.modules[name].delta(), exact, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["hetlora", "rank_partition", "flora"])
def test_aggregate_every_heterogeneous_method(tmp_path, adapters, method):
    out = tmp_path / method
    assert main(["aggregate", *map(str, adapters), "--method", method, "--out", str(out)]) == 0
    assert (out / "report.json").exists() and all((out / a.name / "adapter_model.safetensors").exists() for a in adapters)


def test_fedavg_refuses_mixed_ranks_and_leaves_nothing(tmp_path, adapters, capsys):
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, adapters), "--method", "fedavg", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "same rank per module" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _break_shape(path):
    t = load_file(str(path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = torch.randn(t[key].shape[0], 33)
    save_file(t, str(path / "adapter_model.safetensors"))


def _nan(path):
    t = load_file(str(path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    t[key][0, 0] = float("inf")
    save_file(t, str(path / "adapter_model.safetensors"))


def _base_model(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "another-model"
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "breakage, needle",
    [
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
        (_break_shape, "model.layers.0.self_attn.q_proj"),
        (_nan, "model.layers.1.mlp.down_proj: contains NaN or Inf"),
        (_base_model, "base model 'another-model' differs"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_partial(tmp_path, adapters, capsys, breakage, needle):
    breakage(adapters[1])
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, adapters), "--method", "flexlora", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert "mixed" in err or "another-model" in err
    assert not out.exists()


def test_existing_output_is_never_clobbered(tmp_path, adapters, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["aggregate", *map(str, adapters), "--method", "flexlora", "--out", str(out)]) == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert "output folder exists and is not empty" in capsys.readouterr().err
    assert main(["aggregate", *map(str, adapters), "--method", "flexlora", "--out", str(tmp_path / "new"), "--weights", "1,2"]) == 2
    assert "2 weights given for 3" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
