"""The FlowerTune-style example app (examples/flowertune_flexlora): real ClientApp (transformers +
PEFT, its own loop) and ServerApp (FlexLoRAStrategy), three nodes at three different ranks, on the
in-process grid and on a loopback SuperLink with three SuperNodes."""

import importlib.util
import json
import os
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from flexlora.peft_io import read_adapter  # noqa: E402
from flower_local import LocalGrid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flowertune_flexlora"
sys.path.insert(0, str(EXAMPLE))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flowertune_flexlora import client_app, server_app  # noqa: E402

# three nodes, three rank types: (attention, mlp) = (2, 2), (4, 16), (8, 8)
NODE_CONFIGS = ["partition-id=0 rank-attention=2 rank-mlp=2", "partition-id=1 rank-attention=4 rank-mlp=16", "partition-id=2 rank-attention=8 rank-mlp=8"]


pytestmark = pytest.mark.usefixtures("private_flwr_home", "restore_torch_threads")


def run_config(**overrides) -> dict:
    """The app's run config (its pyproject's defaults) with ``overrides``."""
    defaults = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **overrides}


def node_config(text: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split())}


def check_run(out: Path, rounds: int) -> dict:
    """What every run of the example must leave: completed, each node served at its own ranks from
    round 1 (learned by the query), a global adapter per round and at the end."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == rounds
    report = json.loads((out / "strategy.json").read_text())
    assert len(report["rounds"]) == rounds
    by_partition = {}
    for rec in report["rounds"]:
        assert not rec["dropped"] and len(rec["accepted"]) == 3 and "kept_previous_state" not in rec
        for node, e in rec["nodes"].items():
            assert e["ranks_down"] == e["ranks_up"], node  # the share it got is at the ranks it trains at
            by_partition.setdefault((e["ranks_up"]["q_proj"], e["ranks_up"]["gate_proj"]), []).append(node)
    assert set(by_partition) == {(2, 2), (4, 16), (8, 8)}
    assert report["communication"]["total_bytes"] == report["rounds"][-1]["cumulative_bytes"] > 0
    for r in range(1, rounds + 1):
        assert read_adapter(out / "adapters" / f"round-{r}").modules
    final = read_adapter(out / "final")
    assert any(bool(f.B.any()) for f in final.modules.values())
    return report


def test_example_app_on_the_in_process_grid(tmp_path):
    rc = run_config(out=str(tmp_path / "run"))
    nodes = {101 + i: node_config(c) for i, c in enumerate(NODE_CONFIGS)}
    grid = LocalGrid(client_app.app, nodes, run_config=rc)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    check_run(tmp_path / "run", rc["num-server-rounds"])
    assert all(e["outcome"] == "ok" for e in grid.log)


def _loopback():
    spec = importlib.util.spec_from_file_location("flower_loopback", ROOT / "scripts" / "flower_loopback.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_example_app_on_a_loopback_superlink_with_three_supernodes(tmp_path):
    lb = _loopback()
    out = tmp_path / "run"
    # one round (every ClientApp message is a fresh process here); bfloat16 on the wire: the int16 bits cross real gRPC
    rc = run_config(out=str(out), transport="bfloat16", **{"num-server-rounds": 1})
    report = lb.run_app(EXAMPLE, rc, NODE_CONFIGS, tmp_path / "work", timeout=400)
    assert (out / "summary.json").exists(), Path(report["log"]).read_text()[-3000:]  # flwr run exits 0 even when the run failed
    rec = check_run(out, 1)["rounds"][0]
    assert all(e["payload_up"] == e["payload_down"] for e in rec["nodes"].values())  # both ways in bfloat16 at the same ranks
