"""What a round costs under Flower's Simulation Engine (Ray) vs a loopback deployment, same app and config.

The app: tests/flowertune (the FlowerTune-shaped app: PEFT model, own training loop, the one-line
swap to FlexLoRAStrategy and the client helpers), four nodes at LoRA ranks 2/4/8/16, the tiny
random Llama, the app's run config; every node in every round.

* ``deployment``: ``flower-superlink`` + four ``flower-supernode`` on 127.0.0.1 (``--insecure``), each
  node's rank in its ``--node-config "partition-id=i lora-r=r"``. A SuperNode starts one ClientApp
  process per message (imports, model build, every round).
* ``simulation``: ``flower-superlink --simulation`` on 127.0.0.1 and ``flwr run --federation-config
  "num-supernodes=4 client-resources-num-cpus=N"``; a simulated node has only its partition id, so its
  rank comes from the run config (``node-ranks``). The ClientApp lives in Ray actors for the whole run.
* ``inprocess``: the same ServerApp and ClientApp over tests/flower_local.py's ``LocalGrid`` (no
  processes, no network): the work itself.

A round = the strategy's wall time from ``configure_train`` to the end of ``aggregate_train``
(``strategy.json``; round 1 includes the one-off rank query, and under the Simulation Engine Ray's
start). Also: the whole ``flwr run`` (start-up included), and how far each path's train losses are
from the in-process run's (same seeds; see the notes).

Needs Ray (``pip install "flwr[simulation]"``): run it from an environment that has it.

    python benchmarks/flower_simulation.py [--rounds 4] [--num-cpus 1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, loopback_module, remove_work_folder, save_and_show  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "flowertune"
RANKS = [2, 4, 8, 16]  # partition-id -> lora-r (the app declares 16)
for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(key, value)


def _summary(xs: list[float]) -> dict:
    later = xs[1:] or xs
    return {"per_round": [round(x, 3) for x in xs], "mean_after_round_1": round(statistics.mean(later), 3), "median_after_round_1": round(statistics.median(later), 3)}


def run_config(rounds: int, out: Path) -> dict:
    rc = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**rc, "num-server-rounds": rounds, "save-path": str(out)}


def outcome(out: Path, what: str, log: Path | None = None) -> dict:
    """The run's per-round seconds and train losses (its own files: `flwr run` exits 0 on failure too)."""
    if not (out / "summary.json").exists():
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        raise SystemExit(f"the {what} run did not complete:\n{tail}")
    report = json.loads((out / "strategy.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for rec in report["rounds"]:
        if len(rec["accepted"]) != len(RANKS) or rec["dropped"]:
            raise SystemExit(f"the {what} run did not aggregate every node in round {rec['round']}: {rec['dropped']}")
        if sorted(e["ranks_down"]["q_proj"] for e in rec["nodes"].values()) != RANKS:
            raise SystemExit(f"the {what} run served the wrong ranks in round {rec['round']}")
    return {
        "round_seconds": [float(r["seconds"]) for r in report["rounds"]],
        "train_loss": {r: m["train_loss"] for r, m in summary["train_metrics"].items()},
    }


def run_inprocess(work: Path, rounds: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(APP))
    from flower_local import LocalGrid
    from flowertune_app import client_app_flexlora, server_app
    from flwr.app import Context, RecordDict

    out = work / "inprocess"
    rc = run_config(rounds, out)
    nodes = {i + 1: {"partition-id": i, "lora-r": r} for i, r in enumerate(RANKS)}
    t0 = time.perf_counter()
    server_app.app(LocalGrid(client_app_flexlora.app, nodes, run_config=rc), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return {**outcome(out, "in-process"), "wall_seconds": round(time.perf_counter() - t0, 2)}


def run_deployment(lb, work: Path, rounds: int) -> dict:
    out = work / "deployment"
    node_configs = [f"partition-id={i} lora-r={r}" for i, r in enumerate(RANKS)]
    t0 = time.perf_counter()
    info = lb.run_app(APP, run_config(rounds, out), node_configs, work / "deploy", timeout=900)
    wall = time.perf_counter() - t0
    return {**outcome(out, "deployment", Path(info["log"])), "startup_seconds": info["startup_seconds"], "flwr_run_seconds": info["run_seconds"], "wall_seconds": round(wall, 2)}


def run_simulation(lb, work: Path, rounds: int, num_cpus: int) -> dict:
    import tomli_w

    out = work / "simulation"
    procs = lb.Processes(work)
    rc_path = work / "rc-sim.toml"
    rc_path.write_text(tomli_w.dumps({**run_config(rounds, out), "node-ranks": ",".join(map(str, RANKS))}))
    fed = f"num-supernodes={len(RANKS)} client-resources-num-cpus={num_cpus}"
    t0 = time.perf_counter()
    try:  # a simulation SuperLink of our own (stopped by its PID), not flwr's detached ":local:" one
        env = lb.start_simulation_superlink(procs, work / "home-sim")
        startup = time.perf_counter() - t0
        r, run_seconds = lb.flwr_run(APP, rc_path, env, timeout=900, log=work / "flwr-run-sim.log", extra=["--federation-config", fed])
    finally:
        procs.stop()
    actors = sorted({line.split("pid=")[1].split(")")[0] for line in (r.stdout + r.stderr).splitlines() if "(ClientAppActor pid=" in line})
    return {**outcome(out, "simulation", work / "flwr-run-sim.log"), "startup_seconds": round(startup, 2), "flwr_run_seconds": round(run_seconds, 2),
            "wall_seconds": round(time.perf_counter() - t0, 2), "federation_config": fed, "ray_actors_seen_in_log": len(actors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--num-cpus", type=int, default=1, help="client-resources-num-cpus of each simulated node (an integer in flwr 1.41; Ray runs cores // this at once)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "flower_simulation.json"))
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit('this benchmark needs Ray: pip install "flwr[simulation]"') from None
    env = environment()
    env["versions"].update(flwr=importlib.metadata.version("flwr"), ray=ray_version, transformers=importlib.metadata.version("transformers"), peft=importlib.metadata.version("peft"))
    lb = loopback_module()
    work = Path(tempfile.mkdtemp(prefix="flexlora-simulation-bench-"))
    try:
        paths = {"inprocess": run_inprocess(work, args.rounds)}
        paths["deployment"] = run_deployment(lb, work, args.rounds)
        paths["simulation"] = run_simulation(lb, work, args.rounds, args.num_cpus)
        losses = {p: r["train_loss"] for p, r in paths.items()}
        result = {
            "benchmark": "flower_simulation",
            "environment": env,
            "setup": {
                "app": "tests/flowertune (FlowerTune-shaped app, FlexLoRAStrategy 'flexlora', tiny random Llama)",
                "nodes": [{"partition-id": i, "lora-r": r} for i, r in enumerate(RANKS)],
                "rounds": args.rounds,
                "deployment": "flower-superlink + 4 flower-supernode on 127.0.0.1, --insecure, subprocess isolation (a ClientApp process per message)",
                "simulation": f"flower-superlink --simulation on 127.0.0.1, --disable-runtime-dependency-installation, --federation-config '{paths['simulation']['federation_config']}'",
            },
            "round_seconds": {p: _summary(r["round_seconds"]) for p, r in paths.items()},
            "runs": paths,
            "train_loss_max_rel_diff_vs_inprocess": {
                p: max(abs(v[r] - losses["inprocess"][r]) / abs(losses["inprocess"][r]) for r in losses["inprocess"]) for p, v in losses.items()
            },
            "notes": [
                "a round = configure_train .. end of aggregate_train at the server (strategy.json); round 1 includes the rank query (and, under simulation, Ray's actor start)",
                "wall_seconds: the whole path (start-up, flwr run, shut-down); flwr_run_seconds: `flwr run --stream` alone",
                "deployment: four ClientApp processes per round run concurrently on the machine's cores; simulation: floor(cores / num-cpus) Ray actors, each serving message after message",
                "train losses: the strategy folds the replies in an order set by their content (flexlora.flower.strategy.reply_order), so the node ids Flower draws at each start do not change the bits",
                "machine shared with other jobs (CPU work serialised by a lock): see environment.machine.loadavg_at_start",
            ],
        }
        save_and_show(args.out, result, ("round_seconds", "train_loss_max_rel_diff_vs_inprocess"))
    finally:
        remove_work_folder(work, args.keep)


if __name__ == "__main__":
    main()
