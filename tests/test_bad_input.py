"""Bad input anywhere in the CLI: one line naming the problem, exit 2, before any work."""

import json
from pathlib import Path

from flexlora.cli import main

from tiny import make_peft_adapter

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_unknown_method_option_lists_the_valid_ones(tmp_path, capsys):
    paths = [make_peft_adapter(tmp_path / "a", seed=1), make_peft_adapter(tmp_path / "b", seed=2)]
    assert main(["aggregate", *map(str, paths), "--method", "hetlora", "--out", str(tmp_path / "o"), "--option", "gama=0.9"]) == 2
    err = _one_error_line(capsys)
    assert "method 'hetlora' has no option 'gama'; its options are: device, dtype, gamma, penalty, prune, seed, weighting" in err
    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "r"), "--set", "federation.method_options={bogus = 1}"]) == 2
    assert "its options are: device, dtype, keep_rank, seed, singular_values, svd_path" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_model_folder_without_a_tokenizer_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "r"), "--set", f'model.source="{model}"']) == 2
    assert f"model.source: {model}: no tokenizer in the model folder" in _one_error_line(capsys)
    assert main(["eval", "--config", SMOKE, "--model", str(model), "--out", str(tmp_path / "e.json")]) == 2
    assert "no tokenizer in the model folder" in _one_error_line(capsys)


def test_eval_refuses_a_folder_as_its_output_before_any_work(tmp_path, capsys):
    assert main(["eval", "--config", SMOKE, "--out", str(tmp_path), "--quiet"]) == 2
    assert "is a folder; eval writes one JSON file" in _one_error_line(capsys)
