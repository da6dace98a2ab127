"""The Flower layer: the real ServerApp and ClientApp of flower_app/, driven in-process through
``LocalGrid`` (tests/flower_local.py) (no SuperLink, no network, no Ray), compared with the
in-process simulator; plus the loopback deployment script (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flexlora.cli import main as cli_main  # noqa: E402
from flexlora.config import ConfigError, load_config  # noqa: E402
from flexlora.flower import (  # noqa: E402
    FlowerRunError,
    FlowerSettings,
    NodeProfile,
    arrays_to_factors,
    config_from_json,
    config_to_json,
    config_to_spec,
    factors_to_arrays,
    spec_to_config,
)
from flower_local import LocalGrid  # noqa: E402
from flexlora.methods import get_method  # noqa: E402
from flexlora.simulate import Simulation  # noqa: E402
from flexlora.update import LoraFactors, ModuleSpec, UpdateError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
sys.path.insert(0, str(ROOT / "flower_app"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flexlora_app import client_app, server_app  # noqa: E402

# three training clients, all selected every round: the federation is exactly the three nodes;
# one torch thread: three "nodes" and the server share the cores (2 threads each thrash under load)
BASE = ["data.suite_clients=3", "federation.clients_per_round=3", "model.threads=1"]
FAST = ["eval.at_start=false", "eval.clients=0"]  # no evaluation where a test is about something else
LOST_REPLY_TIMEOUT = 2.0  # round-timeout where a test loses a reply: the round waits this long for it


pytestmark = pytest.mark.usefixtures("private_flwr_home", "restore_torch_threads")


def _strip(rec):
    """What must equal between the simulator and the Flower path: no timings, no Flower extras."""
    if isinstance(rec, dict):
        return {k: _strip(v) for k, v in rec.items() if k not in ("timings", "flower") and "seconds" not in k and "per_second" not in k}
    if isinstance(rec, list):
        return [_strip(v) for v in rec]
    return rec


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _simulate(out: Path, overrides):
    sim = Simulation(load_config(SMOKE, overrides), out, progress=False)
    sim.run()
    return dict(sim.server.fed.types)


def _flower(out: Path, overrides, node_configs, fault=None, grid=None, **run_config):
    grid = grid or LocalGrid(client_app.app, node_configs, fault=fault)
    rc = {"config": SMOKE, "set": "; ".join(overrides), "out": str(out), "min-nodes": len(node_configs), **run_config}
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return grid


def _nodes(types):
    """Node ids 100, 101, ... declaring their partition id and rank type, as --node-config would."""
    return {100 + cid: {"partition-id": cid, "rank-type": t} for cid, t in sorted(types.items())}


def _same_adapters(a: Path, b: Path):
    subs = sorted(p.name for p in a.iterdir())
    assert subs == sorted(p.name for p in b.iterdir())
    for sub in subs:
        ta, tb = load_file(str(a / sub / "adapter_model.safetensors")), load_file(str(b / sub / "adapter_model.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (sub, k)


# -- payloads -------------------------------------------------------------------------------------
def test_factors_and_specs_survive_the_records_in_order():
    g = torch.Generator().manual_seed(0)
    spec = {"b.q_proj": ModuleSpec(4, 16.0), "a.down_proj": ModuleSpec(2, 8.0, rslora=True)}  # not sorted on purpose
    factors = {n: LoraFactors(torch.randn(s.rank, 6, generator=g), torch.randn(5, s.rank, generator=g), s.scale) for n, s in spec.items()}
    back_spec = config_to_spec(spec_to_config(spec))
    assert list(back_spec) == list(spec) and back_spec == spec  # order = the optimizer's parameter order
    back = arrays_to_factors(factors_to_arrays(factors), {n: s.scale for n, s in spec.items()})
    assert list(back) == list(factors)
    for n in factors:
        assert torch.equal(back[n].A, factors[n].A) and torch.equal(back[n].B, factors[n].B) and back[n].scale == factors[n].scale
    # float64 shares go out as float32, rounded exactly as loading them into a float32 adapter does
    f64 = {n: LoraFactors(f.A.double() / 3, f.B.double() / 3, f.scale) for n, f in factors.items()}
    assert torch.equal(arrays_to_factors(factors_to_arrays(f64), {n: s.scale for n, s in spec.items()})["b.q_proj"].A, (f64["b.q_proj"].A).float())


def test_malformed_payloads_name_the_module():
    f = {"m.q_proj": LoraFactors(torch.zeros(2, 4), torch.zeros(3, 2), 8.0)}
    rec = factors_to_arrays(f)
    with pytest.raises(UpdateError, match="m.k_proj: lora_A or lora_B missing"):
        arrays_to_factors(rec, {"m.q_proj": 8.0, "m.k_proj": 8.0})
    with pytest.raises(UpdateError, match="unexpected arrays"):
        arrays_to_factors(rec, {})
    del rec["m.q_proj.B"]
    with pytest.raises(UpdateError, match="missing"):
        arrays_to_factors(rec, {"m.q_proj": 8.0})


def test_run_config_travels_as_json_and_settings_are_checked():
    cfg = load_config(SMOKE, BASE + ['federation.aggregation="ffa"', 'resources.distribution="homo"'])
    back = config_from_json(config_to_json(cfg))
    assert back.to_dict() == cfg.to_dict() and get_method("ffa").local_training(back.train).freeze_A  # FFA's clients freeze A
    assert NodeProfile.from_config(NodeProfile(3, 40, group_ranks={"attention": 4, "mlp": 16}, budget_mib=8.0).to_config()) == NodeProfile(
        3, 40, group_ranks={"attention": 4, "mlp": 16}, budget_mib=8.0
    )
    s = FlowerSettings.from_run_config({"set": "federation.rounds=4; train.lr=1e-4", "aggregation": "hetlora", "config": SMOKE})
    assert s.run_config().federation.rounds == 4 and s.run_config().federation.aggregation == "hetlora"
    with pytest.raises(ConfigError, match="unknown Flower run-config key 'round-timout'"):
        FlowerSettings.from_run_config({"round-timout": 3})
    with pytest.raises(ConfigError, match="unknown method 'fedprox'"):
        FlowerSettings.from_run_config({"aggregation": "fedprox", "config": SMOKE}).run_config()


def test_slora_is_refused_before_any_work(tmp_path):
    if "slora" not in str(load_config(SMOKE).to_dict()):
        pytest.skip("this version has no SLoRA stage")
    with pytest.raises(ConfigError, match="slora.*does not run on Flower"):
        _flower(tmp_path / "run", BASE + FAST + ['federation.algorithm="slora"'], _nodes({0: "type3"}))
    assert not (tmp_path / "run").exists()


# -- the ServerApp and ClientApp against the simulator ---------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The simulator and the Flower path (3 nodes declaring the simulator's rank types), same config and seed."""
    root = tmp_path_factory.mktemp("pair")
    types = _simulate(root / "sim", BASE)
    grid = _flower(root / "flower", BASE, _nodes(types))
    return root / "sim", root / "flower", types, grid


def test_flower_run_equals_the_simulator_bit_for_bit(pair):
    sim, flower, types, _ = pair
    assert len(set(types.values())) == 3  # three different rank types
    assert _strip(_metrics(flower)) == _strip(_metrics(sim))  # losses, ranks, weights, diagnostics, evaluations
    _same_adapters(sim / "final", flower / "final")
    summary = json.loads((flower / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flower"
    assert {k: v["type"] for k, v in summary["nodes"].items()} == {str(k): v for k, v in types.items()}
    simsum = json.loads((sim / "summary.json").read_text())
    for key in ("tokens", "final_train_loss", "rouge_l_weighted", "type_counts"):
        assert summary[key] == simsum[key], key


def test_each_node_gets_its_own_ranks_and_bytes_are_counted(pair):
    _, flower, types, grid = pair
    recs = [r for r in _metrics(flower) if r["round"] > 0]
    for rec in recs:
        nodes = rec["flower"]["nodes"]
        assert set(nodes) == {"0", "1", "2"} and rec["flower"]["attempts"] == 1
        assert all(n["bytes_received"] > 0 and n["bytes_sent"] > 0 for n in nodes.values())
        by_type = {types[int(cid)]: n["bytes_sent"] for cid, n in nodes.items()}
        assert by_type["type3"] > by_type["type2"] > by_type["type1"]  # larger ranks, larger uploads
    trains = [e for e in grid.log if e["type"] == "train"]
    assert len(trains) == 6 and all(e["outcome"] == "ok" for e in trains)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("hetlora", ["federation.method_options={penalty = 0.01}"]),
        ("flora", []),  # round 2 ships the merged base update
        ("rank_partition", []),
        ("fedavg", ['resources.distribution="homo"']),
        ("ffa", ['resources.distribution="homo"']),
        ("rolora", []),  # round 1 trains B, round 2 A: the round reaches the nodes' local training
        # central DP: Poisson sampling, clipping and seeded noise come out the same on both runners
        ("flexlora", ["privacy.clip_norm=0.5", "privacy.noise_multiplier=1.0"]),
        ("fedavg", ['resources.distribution="homo"', "privacy.clip_norm=0.5", "privacy.noise_multiplier=1.0"]),
    ],
)
def test_every_method_is_selectable_and_matches_the_simulator(tmp_path, method, extra):
    overrides = BASE + FAST + extra
    types = _simulate(tmp_path / "sim", overrides + [f'federation.aggregation="{method}"'])
    # nodes declare only their partition id (as in Flower's simulation engine): types follow from it;
    # the method comes from the Flower run config
    _flower(tmp_path / "flower", overrides, {100 + cid: {"partition-id": cid} for cid in types}, aggregation=method)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["aggregation"] == method and summary["status"] == "completed"
    _same_adapters(tmp_path / "sim" / "final", tmp_path / "flower" / "final")
    if any(o.startswith("privacy.") for o in extra):
        sim_summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
        assert summary["privacy"] == sim_summary["privacy"] and summary["privacy"]["epsilon"] > 0
        assert [r.get("privacy") for r in _metrics(tmp_path / "flower")] == [r.get("privacy") for r in _metrics(tmp_path / "sim")]
    if method == "flora":  # round 2 ships the dense merged update: 2 layers x 64 x (64+32+32+64+128+128+128) in the server dtype
        r2 = [r for r in _metrics(tmp_path / "flower") if r["round"] == 2][0]
        itemsize = 8 if load_config(SMOKE, overrides).federation.server_dtype == "float64" else 4
        assert all(n["bytes_received"] > 2 * 64 * 576 * itemsize for n in r2["flower"]["nodes"].values())


def test_budget_mode_ranks_follow_the_budget_each_node_declares(tmp_path):
    overrides = BASE + FAST + ['resources.mode="budget"', "resources.budget_mib=[0.02, 0.05, 0.2]", "resources.budget_ranks=[2, 4, 8, 16]"]
    _simulate(tmp_path / "sim", overrides)
    budgets = [0.02, 0.05, 0.2]
    _flower(tmp_path / "flower", overrides, {100 + cid: {"partition-id": cid, "budget-mib": budgets[cid]} for cid in range(3)})
    _same_adapters(tmp_path / "sim" / "final", tmp_path / "flower" / "final")
    # a node that declares a larger budget trains at a larger rank
    _flower(tmp_path / "rich", overrides, {100 + cid: {"partition-id": cid, "budget-mib": 0.2} for cid in range(3)})
    ranks = {c["id"]: c["ranks"]["q_proj"] for c in _metrics(tmp_path / "rich")[0]["clients"]}
    base = {c["id"]: c["ranks"]["q_proj"] for c in _metrics(tmp_path / "flower")[0]["clients"]}
    assert ranks[0] > base[0] and len(set(base.values())) > 1


# -- failure handling -------------------------------------------------------------------------------
def test_a_node_that_errors_or_times_out_is_left_out_and_the_round_proceeds(tmp_path):
    overrides = BASE + FAST
    types = {0: "type3", 1: "type2", 2: "type1"}

    def fault(node, msg):
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "1":
            return {100: "error", 101: "timeout"}.get(node)
        return None

    _flower(tmp_path / "run", overrides, _nodes(types), fault=fault, **{"min-clients": 1, "round-timeout": LOST_REPLY_TIMEOUT})
    r1, r2 = [r for r in _metrics(tmp_path / "run") if r["round"] > 0]
    status = {c["id"]: c["status"] for c in r1["clients"]}
    assert status == {0: "error", 1: "timeout", 2: "ok"}
    assert "injected failure" in r1["dropped"]["0"][0] and "missed the round timeout" in r1["dropped"]["1"][0]
    assert "aggregation" in r1 and "skipped" not in r1  # the round went on with the one reply
    assert {c["status"] for c in r2["clients"]} == {"ok"} and not r2["dropped"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dropped_updates"] == 2


def test_a_round_without_enough_replies_is_retried(tmp_path):
    seen = []

    def fault(node, msg):  # node 100 fails the first attempt of round 1 only
        if msg.metadata.message_type == "train" and node == 100:
            seen.append(msg.metadata.group_id)
            return "error" if seen.count("1") == 1 and msg.metadata.group_id == "1" else None
        return None

    _flower(tmp_path / "run", BASE + FAST, _nodes({0: "type3", 1: "type2", 2: "type1"}), fault=fault, **{"min-clients": 3, "round-retries": 1})
    r1 = [r for r in _metrics(tmp_path / "run") if r["round"] == 1][0]
    assert r1["flower"]["attempts"] == 2 and r1["flower"]["failed_attempts"][0]["replied"] == 2
    assert {c["status"] for c in r1["clients"]} == {"ok"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_the_run_stops_with_a_clear_message_and_keeps_the_last_good_state(tmp_path, capsys):
    def fault(node, msg):  # node 100 is gone from round 2 on
        return "timeout" if msg.metadata.message_type == "train" and node == 100 and msg.metadata.group_id != "1" else None

    out = tmp_path / "run"
    with pytest.raises(FlowerRunError, match=r"round 2: only 2 of 3 selected node\(s\) replied in 2 attempt\(s\), fewer than min-clients=3.*state of round 1"):
        _flower(out, BASE + FAST, _nodes({0: "type3", 1: "type2", 2: "type1"}), fault=fault, **{"min-clients": 3, "round-retries": 1, "round-timeout": LOST_REPLY_TIMEOUT})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["last_good_round"] == 1 and "min-clients=3" in summary["reason"]
    # what an operator's script checks after `flwr run --stream` (which exits 0 either way)
    assert cli_main(["status", str(out)]) == 1 and "stopped (last good round 1): round 2: only 2 of 3" in capsys.readouterr().out
    assert [r["round"] for r in _metrics(out)] == [1]
    # the adapters written are round 1's: the same as a 1-round simulator run
    _simulate(tmp_path / "sim1", BASE + FAST + ["federation.rounds=1"])
    _same_adapters(tmp_path / "sim1" / "final", out / "final")
    # the node is back: resuming from the kept state finishes the run as if nothing had happened
    _flower(out, BASE + FAST, _nodes({0: "type3", 1: "type2", 2: "type1"}), resume=True, **{"min-clients": 3})
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert cli_main(["status", str(out)]) == 0 and capsys.readouterr().out.startswith("completed: 2 round(s)")
    _simulate(tmp_path / "sim2", BASE + FAST)
    _same_adapters(tmp_path / "sim2" / "final", out / "final")


def test_a_node_that_dies_mid_round_is_recorded_as_unavailable_not_as_a_timeout(tmp_path):
    """Flower answers a message to a node without heartbeat itself, with the SuperLink's id as the
    sender: the reply is matched to its client by the message it answers, at once."""
    def fault(node, msg):
        return "kill" if msg.metadata.message_type == "train" and node == 100 else None

    _flower(tmp_path / "run", BASE + FAST, _nodes({0: "type3", 1: "type2", 2: "type1"}), fault=fault, **{"min-clients": 1})  # round-timeout 600 s
    r1, r2 = [r for r in _metrics(tmp_path / "run") if r["round"] > 0]
    assert [c["status"] for c in r1["clients"]] == ["unavailable", "ok", "ok"]
    assert r1["dropped"]["0"][0].startswith("node unavailable after") and "Node Unavailable" in r1["dropped"]["0"][0]
    assert r1["flower"]["nodes"]["0"]["reply_seconds"] < 60
    # round 2: the node is gone from the grid's node ids, so nothing is sent to it
    assert r2["clients"][0]["status"] == "unavailable" and "is not connected" in r2["dropped"]["0"][0] and r2["flower"]["nodes"]["0"]["bytes_received"] == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_a_restarted_node_is_served_again_and_its_client_keeps_its_state(tmp_path):
    """Node 100 (client 0) dies in round 3 and comes back as node 200 with the same --node-config:
    in round 4 it trains at client 0's ranks as HetLoRA pruned them in round 2, exactly as if the
    node had only failed round 3 (the server keeps a client's state by client id, not node id)."""
    overrides = BASE + FAST + ['federation.aggregation="hetlora"', "federation.method_options={penalty = 0.1, prune = true}", "federation.rounds=4"]
    nodes = _nodes({0: "type3", 1: "type2", 2: "type1"})
    grid = LocalGrid(client_app.app, nodes)

    def dies_and_restarts(node, msg):
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "3" and node == 100:
            grid.join(200, nodes[100])  # restarted: a new node id, the same identity
            return "kill"
        return None

    grid.fault = dies_and_restarts
    _flower(tmp_path / "restart", overrides, nodes, grid=grid, **{"min-clients": 1})
    _flower(tmp_path / "errored", overrides, nodes, fault=lambda n, m: "error" if m.metadata.message_type == "train" and m.metadata.group_id == "3" and n == 100 else None, **{"min-clients": 1})
    recs, ref = _metrics(tmp_path / "restart"), _metrics(tmp_path / "errored")
    assert recs[2]["clients"][0]["status"] == "unavailable" and ref[2]["clients"][0]["status"] == "error"
    assert recs[3]["clients"][0]["status"] == "ok" and recs[3]["flower"]["nodes"]["0"]["node_id"] == 200
    for rec in (recs[2], ref[2]):
        rec["clients"][0].pop("status"), rec.pop("dropped")
    assert _strip(recs) == _strip(ref)  # ranks (pruned ones included), losses, aggregation: the same
    assert recs[3]["clients"][0]["ranks"]["q_proj"] < recs[0]["clients"][0]["ranks"]["q_proj"]  # client 0 pruned its ranks and kept them
    _same_adapters(tmp_path / "restart" / "final", tmp_path / "errored" / "final")
    summary = json.loads((tmp_path / "restart" / "summary.json").read_text())
    assert summary["nodes"]["0"]["node_id"] == 200 and summary["nodes"]["0"]["rejoined"] == [{"round": 4, "node_id": 200, "previous_node_id": 100}]
    assert [e["node"] for e in grid.log if e["type"] == "query"] == [100, 101, 102, 200]  # only the new node is asked who it is


def test_a_node_that_comes_back_with_another_profile_is_not_served(tmp_path):
    nodes = _nodes({0: "type3", 1: "type2", 2: "type1"})
    grid = LocalGrid(client_app.app, nodes)

    def fault(node, msg):
        if msg.metadata.message_type == "train" and node == 100:
            grid.join(200, {"partition-id": 0, "rank-type": "type1"})  # claims client 0 at other ranks
            return "kill"
        return None

    grid.fault = fault
    _flower(tmp_path / "run", BASE + FAST, nodes, grid=grid, **{"min-clients": 1})
    r2 = _metrics(tmp_path / "run")[1]
    assert r2["clients"][0]["status"] == "unavailable" and "rejoined" not in json.loads((tmp_path / "run" / "summary.json").read_text())["nodes"]["0"]


@pytest.mark.parametrize("method", ["flexlora", "hetlora"])
def test_failures_injected_by_the_nodes_equal_the_simulators(tmp_path, method):
    """[failures] on Flower: each node draws its own failure from (seed, round, client), as the
    simulator does, and applies it to its own reply; garbage is dropped by the server's screen."""
    overrides = BASE + FAST + [f'federation.aggregation="{method}"', "federation.rounds=4", "failures.garbage=0.35", "failures.crash=0.2"]
    types = _simulate(tmp_path / "sim", overrides)
    _flower(tmp_path / "flower", overrides, _nodes(types), **{"min-clients": 1})
    sim, fl = _metrics(tmp_path / "sim"), _metrics(tmp_path / "flower")
    kinds = [c["status"] for r in sim for c in r["clients"]]
    assert "crash" in kinds and "rejected" in kinds and "ok" in kinds  # the seed draws all three
    for a, b in zip(sim, fl):
        assert a["dropped"].keys() == b["dropped"].keys()
        for ca, cb in zip(a["clients"], b["clients"]):
            assert (ca["status"], cb["status"]) in (("crash", "error"), (ca["status"], ca["status"]))
            if ca["status"] == "crash":
                assert "crashed during local training (failure injection" in b["dropped"][str(cb["id"])][0]
            elif ca["status"] == "rejected":
                assert a["dropped"][str(ca["id"])] == b["dropped"][str(cb["id"])]
    _same_adapters(tmp_path / "sim" / "final", tmp_path / "flower" / "final")


def test_a_node_without_partition_id_is_left_out_of_the_federation(tmp_path):
    nodes = _nodes({0: "type3", 1: "type2"}) | {102: {"rank-type": "type1"}}
    with pytest.raises(FlowerRunError, match="only 2 node\\(s\\) answered the query, fewer than min-nodes=3"):
        _flower(tmp_path / "run", BASE + FAST, nodes)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "stopped"
    # with min-nodes=2 the two good nodes run on their own
    grid = _flower(tmp_path / "run2", BASE + FAST, nodes, **{"min-nodes": 2})
    assert any(e["outcome"] == "error" and e["type"] == "query" for e in grid.log)
    assert sorted(json.loads((tmp_path / "run2" / "summary.json").read_text())["nodes"]) == ["0", "1"]


def test_duplicate_partition_ids_and_unknown_rank_types_are_refused(tmp_path):
    with pytest.raises(FlowerRunError, match="both declare partition-id 0"):
        _flower(tmp_path / "a", BASE + FAST, {100: {"partition-id": 0}, 101: {"partition-id": 0}})
    with pytest.raises(ConfigError, match="rank-type 'type9'"):
        _flower(tmp_path / "b", BASE + FAST, {100: {"partition-id": 0, "rank-type": "type9"}})


# -- the real deployment on 127.0.0.1 --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["insecure", "tls", "simulation"])
def test_loopback_deployment(tmp_path, mode):
    """The app on 127.0.0.1 (SuperNodes, or Flower's Simulation Engine when Ray is installed) ends
    with the simulator's global adapter."""
    if mode == "simulation":
        pytest.importorskip("ray")
    cmd = [sys.executable, str(ROOT / "scripts" / "flower_loopback.py"), "--work", str(tmp_path / "work"), "--json", str(tmp_path / "report.json")]
    if mode != "insecure":
        cmd.append(f"--{mode}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["adapter_diff"]["max_rel_update_diff"] <= 1e-6
    if mode == "tls":
        assert report["checks"]["unregistered_node_refused"]


@pytest.mark.slow
def test_a_node_killed_mid_round_is_named_unavailable_and_served_again_once_restarted(tmp_path):
    """On a real SuperLink: the node of client 0 is SIGKILLed in round 1 of 2, once the round's
    message reached it, and restarted 10 s later with the same command (a new Flower node id).
    Round 1 records it as unavailable with Flower's reason (when its heartbeat lapses: 30-60 s,
    Flower's fixed interval), round 2 serves it again, and no process is left over. (The
    campaign's ``node-restarted`` scenario, benchmarks/flower_faults.py, one round shorter.)"""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "flower_faults.py"), "--work", str(tmp_path), "--scenario", "node-restarted",
           "--rounds", "2", "--kill-round", "1", "--no-reference"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    row = json.loads((tmp_path / "node-restarted.json").read_text())
    assert "error" not in row and row["status"] == "completed" and row["status_cli"]["exit"] == 0, row
    assert any("SIGKILLed in round 1" in e for e in row["events"]), row["events"]
    assert row["statuses"]["1"]["0"] == "unavailable" and "Node Unavailable" in row["drops"]["1"]["0"][0], row["drops"]
    assert row["statuses"]["2"] == {"0": "ok", "1": "ok", "2": "ok"} and row["node_ids"]["2"]["0"] != row["node_ids"]["1"]["0"]
    assert row["rejoined"]["0"][0]["round"] == 2 and any("client 0" in line and "Node Unavailable" in line for line in row["log_drop_lines"])
    assert row["processes_left_over"] == []


def test_one_engine_plans_both_runners_rounds_and_counts_what_a_node_downloads(tmp_path):
    """The simulator and the Flower server plan and close their rounds with the same engine: their
    round records agree, and the bytes a client downloads are those of the arrays a node really
    receives -- for FLoRA's round 2 its share plus the dense merged base update (once counted with the
    stacked-factor formula, which is not what the messages carry)."""
    overrides = BASE + FAST + ['federation.aggregation="flora"']
    types = _simulate(tmp_path / "sim", overrides)
    _flower(tmp_path / "flower", overrides, _nodes(types))
    sim_recs, fl_recs = _metrics(tmp_path / "sim"), _metrics(tmp_path / "flower")
    assert _strip(fl_recs) == _strip(sim_recs)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64), "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    layers, itemsize = 2, 4
    dense = layers * sum(o * i for o, i in shapes.values()) * itemsize
    r2 = [r for r in fl_recs if r["round"] == 2][0]
    shares = sum(layers * c["ranks"][leaf] * (o + i) * itemsize for c in r2["clients"] for leaf, (o, i) in shapes.items())
    assert r2["bytes_down"] == shares + len(r2["clients"]) * dense
    r1 = [r for r in fl_recs if r["round"] == 1][0]
    assert r1["bytes_down"] == sum(layers * c["ranks"][leaf] * (o + i) * itemsize for c in r1["clients"] for leaf, (o, i) in shapes.items())
