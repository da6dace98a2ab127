"""A FlowerTune-shaped app (tests/flowertune: the structure of Flower's examples/flowertune-llm) run
on the in-process grid: with FedAvg as written, then with the one-line swap to FlexLoRAStrategy and
nodes at ranks 2/4/8/16, with the client helper (every node aggregated every round, the global equal
to the exact weighted sum of the nodes' ``s B A``, FlowerTune's own ``evaluate_fn`` working) and
without it (the load errors of round 1 explained once per node, every node aggregated from round 2)."""

import json
import logging
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from peft import PeftModel  # noqa: E402

from flexlora.flower.payloads import arrays_to_tensors  # noqa: E402
from flexlora.peft_io import factors_from_state_dict, read_adapter  # noqa: E402
from flower_local import LocalGrid  # noqa: E402

APP = Path(__file__).resolve().parent / "flowertune"
sys.path.insert(0, str(APP))

from flowertune_app import client_app, client_app_flexlora, server_app, task  # noqa: E402

RANKS = {1: 2, 2: 4, 3: 8, 4: 16}  # node -> lora-r (the declared rank is 16)
pytestmark = pytest.mark.usefixtures("private_flwr_home", "restore_torch_threads")


def run_config(**overrides) -> dict:
    return {**tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"], **overrides}


def run(app, rc: dict, ranks: dict[int, int] | None) -> list[tuple[int, int, dict]]:
    """Run the ServerApp over the in-process grid; returns every good train reply (round, node, state dict, num-examples)."""
    replies = []

    def recording(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            content = reply.content
            replies.append((int(msg.content["config"]["server-round"]), context.node_id, arrays_to_tensors(content["arrays"]), int(content["metrics"]["num-examples"])))
        return reply

    nodes = {n: {"partition-id": n - 1, **({"lora-r": r} if ranks else {})} for n, r in RANKS.items()}
    server_app.app(LocalGrid(recording, nodes, run_config=rc), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return replies


def exact_sum(replies, server_round: int, alpha: float) -> dict[str, torch.Tensor]:
    """sum_k p_k s_k B_k A_k over the round's replies, in float64 (ranks from the shapes, p_k = n_k / n)."""
    rows = [(sd, n) for r, _, sd, n in replies if r == server_round]
    total = sum(n for _, n in rows)
    out: dict[str, torch.Tensor] = {}
    for sd, n in rows:
        modules, _ = factors_from_state_dict(sd, {"lora_alpha": alpha}, infer_ranks=True)
        for name, f in modules.items():
            out[name] = out.get(name, 0) + (n / total) * f.scale * f.B.double() @ f.A.double()
    return out


def test_fedavg_as_written(tmp_path):
    rc = run_config(strategy="fedavg", **{"save-path": str(tmp_path)})
    replies = run(client_app.app, rc, ranks=None)
    assert len(replies) == 2 * len(RANKS)
    assert {f.name for f in (tmp_path / "2").iterdir()} & {"adapter_model.safetensors", "adapter_model.bin"}  # its evaluate_fn saved the global


def test_the_one_line_swap_with_the_client_helper(tmp_path):
    rc = run_config(**{"save-path": str(tmp_path)})
    replies = run(client_app_flexlora.app, rc, RANKS)
    report = json.loads((tmp_path / "strategy.json").read_text())
    for rec in report["rounds"]:  # every node, every round, at its own rank both ways (learned by the query)
        assert sorted(rec["accepted"]) == sorted(str(n) for n in RANKS) and not rec["dropped"]
        assert {int(n): e["ranks_down"]["q_proj"] for n, e in rec["nodes"].items()} == RANKS
        assert all(e["ranks_up"] == e["ranks_down"] for e in rec["nodes"].values())
    final = read_adapter(tmp_path / "final").modules  # the exact full-rank global
    want = exact_sum(replies, 2, rc["lora-alpha"])
    for name, dense in want.items():
        err = float((final[name].delta().double() - dense).norm() / dense.norm())
        assert err < 1e-5, (name, err)
        assert final[name].rank == min(sum(RANKS.values()), *dense.shape)
    # FlowerTune's evaluate_fn loaded the global into its rank-16 model and saved it (at the declared rank)
    saved = PeftModel.from_pretrained(task.base_model(), str(tmp_path / "2"))
    assert saved.peft_config["default"].r == 16


def test_the_swap_without_the_client_helper_explains_and_recovers(tmp_path, caplog):
    rc = run_config(**{"save-path": str(tmp_path), "num-server-rounds": 3})
    with caplog.at_level(logging.INFO, logger="flwr.flexlora"):
        replies = run(client_app.app, rc, RANKS)
    report = json.loads((tmp_path / "strategy.json").read_text())
    first, *later = report["rounds"]
    # round 1: nodes below the declared rank could not load the rank-16 share; the record says why
    assert first["accepted"] == ["4"] and sorted(first["load_errors"]) == ["1", "2", "3"]
    assert all(first["dropped"][n][0].startswith("load error: its model's LoRA ranks") for n in ("1", "2", "3"))
    # one warning per such node, naming the cause and the fix, not one per round
    told = [r.getMessage() for r in caplog.records if "cannot load its share" in r.getMessage()]
    assert len(told) == 3 and all("flexlora.flower.client" in m and "served at its own ranks from the next round" in m for m in told)
    # from round 2 on every node is served at its own rank and aggregated
    for rec in later:
        assert sorted(rec["accepted"]) == ["1", "2", "3", "4"] and not rec["dropped"]
        assert {int(n): e["ranks_down"]["q_proj"] for n, e in rec["nodes"].items()} == RANKS
    final = read_adapter(tmp_path / "final").modules
    for name, dense in exact_sum(replies, 3, rc["lora-alpha"]).items():
        assert float((final[name].delta().double() - dense).norm() / dense.norm()) < 1e-5, name


@pytest.mark.slow
def test_under_flowers_simulation_engine(tmp_path):
    """`flwr run` with Flower's Simulation Engine (Ray): a simulated node has only its partition-id,
    so its rank comes from the run config (``node-ranks``); every node is served at its own rank."""
    pytest.importorskip("ray")
    import importlib.util

    import tomli_w

    spec = importlib.util.spec_from_file_location("flower_loopback", Path(__file__).resolve().parents[1] / "scripts" / "flower_loopback.py")
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    procs = lb.Processes(tmp_path)
    try:
        env = lb.start_simulation_superlink(procs, tmp_path / "home")
        rc = run_config(**{"save-path": str(tmp_path / "run"), "node-ranks": ",".join(str(RANKS[n]) for n in sorted(RANKS))})
        (tmp_path / "rc.toml").write_text(tomli_w.dumps(rc))
        lb.flwr_run(APP, tmp_path / "rc.toml", env, timeout=500, log=tmp_path / "flwr-run.log", extra=["--federation-config", "num-supernodes=4 client-resources-num-cpus=1"])
    finally:
        procs.stop()
    assert (tmp_path / "run" / "summary.json").exists(), (tmp_path / "flwr-run.log").read_text()[-3000:] + procs.log("superlink")[-3000:]
    log = (tmp_path / "flwr-run.log").read_text()
    assert "Starting Flower Simulation" in log and "(4 simulated SuperNodes)" in log, log[-3000:]  # Flower's Simulation Engine, not a deployment
    report = json.loads((tmp_path / "run" / "strategy.json").read_text())
    assert len(report["rounds"]) == 2
    for rec in report["rounds"]:
        assert len(rec["accepted"]) == 4 and not rec["dropped"]
        assert sorted(e["ranks_down"]["q_proj"] for e in rec["nodes"].values()) == sorted(RANKS.values())
        assert all(e["ranks_up"] == e["ranks_down"] for e in rec["nodes"].values())
