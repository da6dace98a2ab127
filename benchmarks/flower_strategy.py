"""FlexLoRAStrategy in a FlowerTune-style app (examples/flowertune_flexlora) on a loopback SuperLink
with three SuperNodes, against `flexlora run` on the same config.

Same workload on every path: the tiny model, three training clients of the built-in suite (one per
node) at the ranks `flexlora run` gives them (configs/smoke.toml's resource types), all of them in
every round, the same local steps, batch size, learning rate and LoRA alpha, one torch thread per
process, no evaluation.

* ``flexlora run``: the in-process simulator (the CLI in a subprocess); a round = training +
  aggregation + diagnostics from its metrics.jsonl.
* ``strategy_float32`` / ``strategy_bfloat16``: the example app with the factors on the wire in
  float32 / bfloat16; a round = the strategy's wall time from ``configure_train`` to the end of
  ``aggregate_train`` (round 1 includes the one-off query of the nodes' ranks).

Also: bytes per node per round (Flower message objects as pushed / pulled, and the raw factor
bytes), and the aggregate's relative distance from the exact weighted sum ``sum_k p_k s_k B_k A_k``:
of the factors as received, and (measured by the float32 run on its own updates) what float16 /
bfloat16 transport would add, up and down.

    python benchmarks/flower_strategy.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, remove_work_folder, save_and_show  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flowertune_flexlora"
SMOKE = ROOT / "configs" / "smoke.toml"
OVERRIDES = ["data.suite_clients=3", "federation.clients_per_round=3", "model.threads=1", "eval.at_start=false", "eval.clients=0"]
for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(key, value)


def _loopback_module():
    spec = importlib.util.spec_from_file_location("flower_loopback", ROOT / "scripts" / "flower_loopback.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(xs: list[float]) -> dict:
    return {"per_round": [round(x, 3) for x in xs], "mean": round(statistics.mean(xs), 3), "median": round(statistics.median(xs), 3)}


def run_simulator(out: Path, rounds: int) -> list[dict]:
    """`flexlora run` on the smoke config; its rounds' records."""
    cmd = [sys.executable, "-m", "flexlora.cli", "run", "--config", str(SMOKE), "--out", str(out), "--quiet"]
    for o in OVERRIDES + [f"federation.rounds={rounds}"]:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if r["round"] > 0]


def example_run_config(rounds: int, out: Path, transport: str) -> dict:
    """The example's run config matched to the smoke config (steps, batch, lr, alpha, dropout, data)."""
    from flexlora.config import load_config

    cfg = load_config(str(SMOKE), OVERRIDES)
    rc = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rc.update({
        "num-server-rounds": rounds, "lr": cfg.train.lr, "batch-size": cfg.train.batch_size, "max-steps": cfg.train.max_steps,
        "max-length": cfg.train.max_length, "lora-alpha": cfg.lora.alpha, "lora-dropout": cfg.train.lora_dropout,
        "suite-clients": cfg.data.suite_clients, "suite-examples": cfg.data.suite_examples, "seed": cfg.federation.seed,
        "threads": 1, "transport": transport, "save-every": 0, "out": str(out),
    })
    return rc


def run_example(lb, work: Path, rounds: int, node_configs: list[str], transport: str) -> tuple[dict, dict]:
    out = work / f"example-{transport}"
    rc = example_run_config(rounds, out, transport)
    t0 = time.perf_counter()
    info = lb.run_app(EXAMPLE, rc, node_configs, work / f"deploy-{transport}", timeout=600)
    info["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if not (out / "summary.json").exists():  # flwr run exits 0 even when the run failed
        raise SystemExit(f"the {transport} run did not complete; see {info['log']}:\n{Path(info['log']).read_text()[-3000:]}")
    return json.loads((out / "strategy.json").read_text()), info


def probe_transport(work: Path, rounds: int, node_configs: list[str], probe: tuple[str, ...]) -> list[dict]:
    """The example's ClientApp on the in-process grid, served by a TransportProbe (float32 on the
    wire): per round, what each dtype of ``probe`` would add on that round's updates."""
    sys.path.insert(0, str(ROOT / "tests"))  # test helpers: the in-process grid
    sys.path.insert(0, str(EXAMPLE))
    from flower_local import LocalGrid
    from flowertune_flexlora import client_app, task
    from flwr.app import ArrayRecord
    from peft import get_peft_model_state_dict
    from transport_error import TransportProbe

    rc = example_run_config(rounds, work / "probe", "float32")
    nodes = {101 + i: {k: int(v) for k, v in (kv.split("=") for kv in c.split())} for i, c in enumerate(node_configs)}
    model, _ = task.peft_model(rc)
    strategy = TransportProbe(str(rc["method"]), lora_config=task.lora_config(rc), probe=probe)
    strategy.start(LocalGrid(client_app.app, nodes, run_config=rc), ArrayRecord(get_peft_model_state_dict(model)), num_rounds=rounds)
    return [r["transport_error"] for r in strategy.history]


def adapter_distance(a: Path, b: Path) -> float:
    """Relative Frobenius distance between two adapters' dense updates, over all modules."""
    from flexlora.peft_io import read_adapter

    fa, fb = read_adapter(a).modules, read_adapter(b).modules
    num = sum(float((fa[n].delta() - fb[n].delta()).norm() ** 2) for n in fa)
    den = sum(float(fa[n].delta().norm() ** 2) for n in fa)
    return (num / den) ** 0.5 if den > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds (proves the script works; timings not for the record)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "flower_strategy.json"))
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    env = environment()
    lb = _loopback_module()
    work = Path(tempfile.mkdtemp(prefix="flexlora-strategy-bench-"))
    try:
        sim = run_simulator(work / "simulator", rounds)
        ranks = {int(c["id"]): c["ranks"] for c in sim[0]["clients"]}
        node_configs = [f"partition-id={cid} rank-attention={r['q_proj']} rank-mlp={r['gate_proj']}" for cid, r in sorted(ranks.items())]
        f32, f32_info = run_example(lb, work, rounds, node_configs, "float32")
        bf16, bf16_info = run_example(lb, work, rounds, node_configs, "bfloat16")
        probed = probe_transport(work, rounds, node_configs, ("float16", "bfloat16"))

        sim_s = [r["timings"]["train"] + r["timings"].get("aggregate", 0.0) + r["timings"].get("diagnostics", 0.0) for r in sim]
        f32_s = [r["seconds"] for r in f32["rounds"]]
        bf16_s = [r["seconds"] for r in bf16["rounds"]]

        def per_node(report: dict) -> dict:
            out: dict = {}
            for r in report["rounds"]:
                for node, e in sorted(r["nodes"].items()):
                    out.setdefault(node, {"ranks": e.get("ranks_up"), "rounds": []})["rounds"].append(
                        {"round": r["round"], **{k: e.get(k, 0) for k in ("bytes_down", "bytes_up", "payload_down", "payload_up")}})
            return out

        def later_rounds_mean(report: dict, key: str) -> float:  # rounds after the first (no query messages)
            rows = [e[key] for r in report["rounds"] if r["round"] > 1 for e in r["nodes"].values()]
            return statistics.mean(rows) if rows else float("nan")

        result = {
            "benchmark": "flower_strategy",
            "environment": env,
            "setup": {
                "config": "configs/smoke.toml",
                "overrides": OVERRIDES + [f"federation.rounds={rounds}"],
                "nodes": node_configs,
                "rounds": rounds,
                "app": "examples/flowertune_flexlora (FlexLoRAStrategy 'flexlora')",
                "deployment": "flower-superlink + 3 flower-supernode on 127.0.0.1, --insecure, subprocess isolation (a ClientApp process per message)",
            },
            "round_seconds": {"flexlora_run": _summary(sim_s), "strategy_float32": _summary(f32_s), "strategy_bfloat16": _summary(bf16_s)},
            "overhead_seconds_per_round_vs_flexlora_run": {
                "strategy_float32": round(statistics.mean(a - b for a, b in zip(f32_s, sim_s)), 3),
                "strategy_bfloat16": round(statistics.mean(a - b for a, b in zip(bf16_s, sim_s)), 3),
                "strategy_float32_after_round_1": round(statistics.mean(a - b for a, b in list(zip(f32_s, sim_s))[1:]), 3) if rounds > 1 else None,
            },
            "bytes_per_node_per_round": {"float32": per_node(f32), "bfloat16": per_node(bf16)},
            "bytes_per_node_per_round_mean_after_round_1": {
                t: {k: round(later_rounds_mean(rep, k), 1) for k in ("bytes_down", "bytes_up", "payload_down", "payload_up")} for t, rep in (("float32", f32), ("bfloat16", bf16))
            },
            "total_bytes": {"float32": f32["communication"]["total_bytes"], "bfloat16": bf16["communication"]["total_bytes"]},
            "aggregate_rel_error_vs_exact": {
                "float32_as_received": [r["aggregation"]["max_rel_error_vs_exact"] for r in f32["rounds"]],
                "bfloat16_as_received": [r["aggregation"]["max_rel_error_vs_exact"] for r in bf16["rounds"]],
                "transport_added_on_the_float32_runs_updates": {t: [r[t] for r in probed] for t in ("float16", "bfloat16")},
            },
            "final_global_rel_distance_bfloat16_vs_float32_run": round(adapter_distance(work / "example-float32" / "final", work / "example-bfloat16" / "final"), 6),
            "deployment_seconds": {"float32": f32_info, "bfloat16": bf16_info},
            "notes": [
                "a strategy round = configure_train .. end of aggregate_train at the server (round 1 includes the query for each node's ranks)",
                "flexlora run trains the three clients one after the other in one process; the deployment trains them concurrently in three ClientApp processes on the same cores",
                "the deployment's overhead is mostly the per-message ClientApp process (imports, model build) and the SuperNode's polling",
                "bytes: Flower message objects (deflated) as pushed/pulled; payload: the raw factor bytes in the transport dtype",
                "as_received: the method's own distance (FlexLoRA is exact: ~1e-7 in float32); transport_added: aggregate of the round-tripped updates vs the exact sum of the originals, and the largest share error, measured by benchmarks/transport_error.py's TransportProbe on the same workload run in-process (float32 on the wire)",
                "the bfloat16 run's final global differs from the float32 run's by the transport error compounded through local training",
                "machine shared with other jobs: see environment.machine.loadavg_at_start",
            ],
        }
        for key in ("deployment_seconds",):
            for info in result[key].values():
                info.pop("log", None)
        save_and_show(args.out, result, ("round_seconds", "overhead_seconds_per_round_vs_flexlora_run", "bytes_per_node_per_round_mean_after_round_1", "aggregate_rel_error_vs_exact"))
    finally:
        remove_work_folder(work, args.keep)


if __name__ == "__main__":
    main()
