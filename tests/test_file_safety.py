"""Nothing of the user's is deleted or overwritten: output folders that are, contain or lie inside an
input, the working directory, a link to an input, or a folder flexlora did not write are refused before
any work; --overwrite replaces only a flexlora output, and only once the new result is complete."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flexlora.cli import main
from flexlora.fsutil import MARKER
from flexlora.peft_io import read_adapter

from tiny import make_peft_adapter

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
FAST = ["federation.rounds=1", "federation.clients_per_round=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path):
    work = tmp_path / "work"
    a = make_peft_adapter(work / "clientA", seed=1, r=2)
    b = make_peft_adapter(work / "clientB", seed=2, r=4)
    (work / "notes.txt").write_text("the user's own file")
    return work, a, b


def _aggregate(a, b, out, *extra):
    return main(["aggregate", str(a), str(b), "--method", "flexlora", "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["input", "parent of the inputs", "inside an input", "link to an input", "working directory"])
def test_an_output_folder_that_puts_user_files_at_risk_is_refused(inputs, capsys, monkeypatch, where):
    work, a, b = inputs
    before = _snapshot(work)
    out = {"input": a, "parent of the inputs": work, "inside an input": a / "shares", "link to an input": work / "link", "working directory": Path(".")}[where]
    if where == "link to an input":
        os.symlink(a, out)
    monkeypatch.chdir(work)
    assert _aggregate(a, b, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(out) in err, err
    assert _snapshot(work) == before  # nothing lost, nothing partial
    assert not (a / "shares").exists()


def test_overwrite_replaces_only_a_folder_flexlora_wrote(inputs, tmp_path, capsys):
    work, a, b = inputs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert _aggregate(a, b, mine, "--overwrite") == 2
    assert "replaces only a folder flexlora wrote" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "agg"
    assert _aggregate(a, b, out) == 0 and (out / MARKER).is_file()
    (out / "stale-share").mkdir()
    assert _aggregate(a, b, out, "--overwrite") == 0
    assert not (out / "stale-share").exists() and (out / "report.json").is_file()


def test_overwrite_killed_while_the_old_output_is_deleted_leaves_a_whole_output(inputs, tmp_path, monkeypatch):
    """--overwrite used to delete the old output before renaming the new one into place: a process killed
    during that deletion left a half-deleted output and no new one. Now the target is old or new, whole."""
    import shutil

    from flexlora import fsutil

    work, a, b = inputs
    out = tmp_path / "agg"
    assert _aggregate(a, b, out) == 0
    old = _snapshot(out)
    real_rmtree = shutil.rmtree
    killed = []

    def rmtree_killed_halfway(path, *args, **kwargs):
        if not killed:  # the first deletion: remove one file, then the process dies
            killed.append(path)
            next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
            raise KeyboardInterrupt("killed")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fsutil.shutil, "rmtree", rmtree_killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        _aggregate(b, a, out, "--weights", "1,3", "--overwrite")
    monkeypatch.setattr(fsutil.shutil, "rmtree", real_rmtree)
    now = _snapshot(out)
    assert now == old or (now.keys() == old.keys() and now != old), "a half-deleted output"
    assert read_adapter(out / "clientA") and read_adapter(out / "clientB") and (out / "report.json").is_file()


def test_two_inputs_with_the_same_folder_name_get_distinct_output_names(tmp_path):
    a = make_peft_adapter(tmp_path / "runA" / "checkpoint-10", seed=1, r=2)
    b = make_peft_adapter(tmp_path / "runB" / "checkpoint-10", seed=2, r=4)
    out = tmp_path / "agg"
    assert _aggregate(a, b, out) == 0
    assert read_adapter(out / "runA-checkpoint-10").specs != read_adapter(out / "runB-checkpoint-10").specs
    assert json.loads((out / "report.json").read_text())["weights"].keys() == {"runA-checkpoint-10", "runB-checkpoint-10"}


def test_a_run_refuses_a_non_empty_folder_and_overwrite_replaces_a_run_whole(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.csv").write_text("not a run")
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", *sum((["--set", o] for o in FAST), [])]) == 2
    assert "output folder exists and is not empty" in capsys.readouterr().err
    assert (out / "data.csv").read_text() == "not a run"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--overwrite", *sum((["--set", o] for o in FAST), [])]) == 2
    run = tmp_path / "run2"
    homo = [*FAST, 'resources.distribution="homo"']
    assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", *sum((["--set", o] for o in FAST), [])]) == 0
    first = {p.name for p in (run / "final").iterdir()}
    assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", "--overwrite", *sum((["--set", o] for o in homo), [])]) == 0
    second = {p.name for p in (run / "final").iterdir()}
    assert second == {"global", "type1"} and first != second  # the new run's adapters only, never mixed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_adapters"] == str(run / "final") and summary["type_counts"] == {"type1": 10}
    assert all(load_file(str(run / "final" / s / "adapter_model.safetensors")) for s in second)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run2")]  # no staging folder left


def test_resume_continues_only_a_run_flexlora_wrote(inputs, tmp_path, capsys):
    """--resume on the user's own folder used to start a run there, replacing their config.json and metrics.jsonl."""
    sets = sum((["--set", o] for o in FAST), [])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "own settings"}')
    (mine / "metrics.jsonl").write_text('{"my": "own measurements"}')
    before = _snapshot(mine)
    assert main(["run", "--config", SMOKE, "--out", str(mine), "--quiet", "--resume", *sets]) == 2
    err = capsys.readouterr().err
    assert "--resume continues only a run flexlora wrote" in err and str(mine) in err and err.count("\n") == 1, err
    assert _snapshot(mine) == before and not (mine / MARKER).exists()
    work, a, b = inputs
    agg = tmp_path / "agg"
    assert _aggregate(a, b, agg) == 0
    before = _snapshot(agg)
    assert main(["run", "--config", SMOKE, "--out", str(agg), "--quiet", "--resume", *sets]) == 2
    assert "holds a flexlora aggregate output, not a run" in capsys.readouterr().err
    assert _snapshot(agg) == before


def test_bad_settings_and_inputs_give_one_line_not_a_traceback(inputs, tmp_path, capsys):
    """Method options, ignored weights and a corrupt checkpoint: one line naming the problem, exit 2."""
    work, a, b = inputs
    assert main(["aggregate", str(a), str(b), "--method", "flexlora", "--out", str(tmp_path / "o1"), "--option", "dtype=bfloat16"]) == 2
    assert "--option dtype=bfloat16" in capsys.readouterr().err
    assert main(["aggregate", str(a), str(b), "--method", "hetlora", "--out", str(tmp_path / "o2"), "--weights", "1,3"]) == 2
    assert "ignores --weights" in capsys.readouterr().err
    assert main(["aggregate", str(a), str(b), "--method", "hetlora", "--out", str(tmp_path / "o3"), "--weights", "1,3", "--option", "weighting=data"]) == 0
    run = tmp_path / "run"
    sets = sum((["--set", o] for o in FAST), [])
    assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", *sets]) == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        if (run / name).exists():
            (run / name).write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", "--resume", *sets]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
