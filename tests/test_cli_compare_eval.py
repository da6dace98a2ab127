import json
from pathlib import Path

import pytest

from flexlora.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
FAST = ["--set", "federation.rounds=1", "--set", "train.max_steps=1", "--set", "eval.at_start=false"]


def test_compare_runs_methods_on_one_config_and_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--config", SMOKE, "--out", str(out), "--methods", "flexlora,hetlora", "--quiet", *FAST, "--set", "eval.eval_loss=true"]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["aggregation"] for r in rows] == ["flexlora", "hetlora"]
    assert (out / "compare.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "flexlora compare" in printed
    # every held-out figure has its 95% interval; the second method its paired difference to the first
    for row in rows:
        low, high = row["intervals"]["rouge_l_weighted"]
        assert low <= row["rouge_l_weighted"] <= high
        assert row["intervals"]["proxy_eval_loss"][0] <= row["proxy_eval_loss"] <= row["intervals"]["proxy_eval_loss"][1]
    diff = rows[1]["vs_first"]
    assert diff["run"] == "flexlora" and "vs_first" not in rows[0]
    assert diff["proxy_eval_loss"]["difference"] == pytest.approx(rows[1]["proxy_eval_loss"] - rows[0]["proxy_eval_loss"])
    assert diff["proxy_eval_loss"]["low"] <= diff["proxy_eval_loss"]["difference"] <= diff["proxy_eval_loss"]["high"]
    assert "diff eval loss" in printed and "95% bootstrap interval over the 2 held-out clients" in printed and "first run, flexlora" in printed
    import matplotlib.pyplot as plt

    from flexlora.compare import runs_figure

    fig = runs_figure(out, ["flexlora", "hetlora"])
    for ax in fig.axes:  # rounds are whole numbers on the axes
        assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)
    # a finished comparison is resumable: nothing is rerun
    before = (out / "flexlora" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["compare", "--config", SMOKE, "--out", str(out), "--methods", "flexlora,hetlora", "--quiet", *FAST, "--set", "eval.eval_loss=true"]) == 0
    assert (out / "flexlora" / "metrics.jsonl").stat().st_mtime_ns == before


def test_eval_command_scores_an_adapter_and_the_base_model(tmp_path):
    run = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(run), "--quiet", *FAST]) == 0
    for adapter in (["--adapter", str(run / "final" / "global")], []):
        out = tmp_path / f"eval{len(adapter)}.json"
        assert main(["eval", *adapter, "--config", SMOKE, "--out", str(out), "--quiet"]) == 0
        result = json.loads(out.read_text())
        assert result["num_examples"] > 0 and 0 <= result["rouge_l_weighted"] <= 100
        low, high = result["intervals"]["rouge_l_weighted"]
        assert low <= result["rouge_l_weighted"] <= high


def test_eval_refuses_a_broken_adapter_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    assert main(["eval", "--adapter", str(bad), "--config", SMOKE, "--out", str(tmp_path / "x.json"), "--quiet"]) == 2
    assert "adapter_config.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
