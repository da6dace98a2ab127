"""Own data is evaluated like NI: every data kind has held-out clients that `run` and `eval` score."""

import json
from pathlib import Path

import pytest

from flexlora.cli import main
from flexlora.config import ConfigError, load_config
from flexlora.data.clients import load_clients

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
FAST = ["--set", "federation.rounds=1", "--set", "train.max_steps=1", "--set", "eval.at_start=false", "--set", "federation.clients_per_round=2"]
CATEGORIES = ("open_qa", "summarization", "classification", "brainstorming")


def _dolly(path: Path, per_category: int = 5) -> Path:
    """A small Dolly-style JSONL file (context/response naming)."""
    rows = [
        {"instruction": f"Answer {cat} question {i}.", "context": f"about {cat}", "response": f"answer {i}", "category": cat}
        for cat in CATEGORIES
        for i in range(per_category)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _instruct_cfg(data: Path, *extra: str):
    return load_config(SMOKE, ['data.kind="instruct"', f'data.path="{data}"', "data.num_clients=6", *extra])


def test_instruct_data_holds_out_a_seeded_tenth_of_its_clients_with_all_their_records(tmp_path):
    data = _dolly(tmp_path / "d.jsonl")
    clients = load_clients(_instruct_cfg(data))
    held = [c for c in clients if c.heldout]
    assert len(held) == 1  # 10% of 6, at least one
    assert all(not c.train and c.eval and c.num_examples > 0 for c in held)  # never trains: every record is unseen
    assert [c.client_id for c in load_clients(_instruct_cfg(data)) if c.heldout] == [c.client_id for c in held]
    assert sum(len(c.train) + len(c.eval) for c in clients) == 20  # nothing lost
    other_seeds = {tuple(c.client_id for c in load_clients(_instruct_cfg(data, f"federation.seed={s}")) if c.heldout) for s in range(6)}
    assert len(other_seeds) > 1
    assert sum(c.heldout for c in load_clients(_instruct_cfg(data, "data.heldout_clients=3"))) == 3
    assert sum(c.heldout for c in load_clients(_instruct_cfg(data, "data.heldout_fraction=0.5"))) == 3


def test_heldout_file_is_honoured_for_instruct_and_suite_data(tmp_path):
    data = _dolly(tmp_path / "d.jsonl")
    listed = tmp_path / "held.json"
    listed.write_text(json.dumps({"client_ids": [0, 4]}))
    clients = load_clients(_instruct_cfg(data, f'data.heldout_file="{listed}"'))
    assert [c.client_id for c in clients if c.heldout] == [0, 4]
    suite = load_clients(load_config(SMOKE, [f'data.heldout_file="{listed}"']))
    assert [c.client_id for c in suite if c.heldout] == [0, 4]
    listed.write_text(json.dumps([0, 99]))
    with pytest.raises(ValueError, match=r"held\.json: lists client ids that the data does not have: \[99\]"):
        load_clients(_instruct_cfg(data, f'data.heldout_file="{listed}"'))


def test_suite_heldout_count_is_its_number_of_heldout_tasks():
    assert sum(c.heldout for c in load_clients(load_config(SMOKE, ["data.heldout_clients=3"]))) == 3
    with pytest.raises(ConfigError, match="data.heldout_clients: the suite can hold out at most 32"):
        load_config(SMOKE, ["data.heldout_clients=33"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.heldout_clients=2", "data.heldout_fraction=0.2"], "set one of data.heldout_clients, data.heldout_fraction"),
        (['data.heldout_file="nowhere.json"'], "data.heldout_file: nowhere.json is not a file"),
        (["data.heldout_fraction=1.5"], r"data.heldout_fraction must be in \[0, 1\)"),
    ],
)
def test_heldout_settings_are_checked_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


def test_run_and_eval_report_zero_shot_rouge_on_own_instruct_data(tmp_path, capsys):
    data = _dolly(tmp_path / "d.jsonl")
    sets = ["--set", 'data.kind="instruct"', "--set", f'data.path="{data}"', "--set", "data.num_clients=6"]
    run = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", *FAST, *sets]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_clients"] == 1 and summary["rouge_l_weighted"] is not None and summary["eval_note"] is None
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(run / "final" / "global"), "--config", SMOKE, "--out", str(out), "--quiet", *sets]) == 0
    result = json.loads(out.read_text())
    assert len(result["per_client"]) == 1 and result["rouge_l_weighted"] is not None


def test_nothing_to_evaluate_is_said_at_start_and_eval_names_why(tmp_path, capsys):
    data = _dolly(tmp_path / "d.jsonl")
    sets = ["--set", 'data.kind="instruct"', "--set", f'data.path="{data}"', "--set", "data.num_clients=6", "--set", "data.heldout_clients=0"]
    run = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", *FAST, *sets]) == 0
    err = capsys.readouterr().err
    assert "nothing will be evaluated" in err and "no held-out clients" in err
    assert "no held-out clients" in json.loads((run / "summary.json").read_text())["eval_note"]
    code = main(["eval", "--config", SMOKE, "--out", str(tmp_path / "e.json"), "--quiet", *sets])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to evaluate: no held-out clients" in err and "--all-clients" in err
    assert "no client has examples" not in err
    assert main(["eval", "--config", SMOKE, "--out", str(tmp_path / "e.json"), "--quiet", "--all-clients", *sets]) == 0


def test_the_readme_config_for_own_model_and_data_is_valid(tmp_path):
    """README "Your own model and data": its config passes the checks (with a data file and the tiny model)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model and data") :]
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    data = _dolly(tmp_path / "my_data.jsonl", per_category=12)
    cfg_path = tmp_path / "my_run.toml"
    cfg_path.write_text(toml.replace('"models/my-model"', '"tiny"').replace('"data/my_data.jsonl"', f'"{data}"'))
    cfg = load_config(cfg_path)
    assert cfg.lora.targets == "all-linear" and cfg.data.heldout_clients == 3
    assert sum(c.heldout for c in load_clients(cfg)) == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.partition="random"', "data.partition must be 'dirichlet' or 'category'"),
        ('data.on_error="ignore"', "data.on_error must be 'raise' or 'skip'"),
        ("data.num_clients=0", "data.num_clients must be >= 1"),
        ("data.suite_clients=0", "data.suite_clients must be >= 1"),
        ("data.dirichlet_alpha=0", "data.dirichlet_alpha must be > 0"),
    ],
)
def test_data_settings_are_checked_before_the_model_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, [override])


def test_a_split_the_heldout_clients_lack_is_said_at_start_not_after_training(tmp_path, capsys, tiny_model, tiny_tokenizer):
    import copy

    from flexlora.simulate import Simulation

    cfg = load_config(SMOKE, ['eval.split="test"', "federation.rounds=1", "train.max_steps=1", "federation.clients_per_round=2"])
    summary = Simulation(cfg, tmp_path / "run", model=copy.deepcopy(tiny_model), tokenizer=tiny_tokenizer, progress=False).run()
    assert "held-out clients have no examples in split 'test'" in capsys.readouterr().err
    assert summary["rouge_l_weighted"] is None and "split 'test'" in summary["eval_note"]
