"""The server's share of a FlexLoRA round in ``make demo``: aggregation + diagnostics + checkpoint
over the round's wall time (local training, aggregation, diagnostics, evaluation, checkpoint).

Runs the FlexLoRA entry of ``configs/demo.toml`` (heavy-tail-strong, SmolLM2-135M, 4 rounds x 4
clients) in a fresh folder, or reads a finished one (``--run-dir runs/demo/flexlora-heavy-tail-strong``
after ``make demo``), and writes ``benchmarks/results/server_share.json``. Time it on an idle
machine: two CPU-heavy processes on two cores slow LAPACK down 50-80x. Where the server's seconds
go, part by part and without training: ``benchmarks/server_round.py``.

    python benchmarks/server_share.py [--run-dir DIR] [--label flexlora-heavy-tail-strong]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVER = ("aggregate", "diagnostics", "checkpoint")


def run_demo_entry(label: str, out: Path) -> None:
    from flexlora.compare import expand_runs
    from flexlora.config import load_config_dict
    from flexlora.simulate import Simulation

    runs = dict(expand_runs(load_config_dict(ROOT / "configs" / "demo.toml")))
    if label not in runs:
        raise SystemExit(f"server_share: no [[compare]] entry {label!r} in configs/demo.toml (have {sorted(runs)})")
    Simulation(runs[label], out, progress=True).run()


def share_of(run_dir: Path) -> dict:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for rec in rounds:
        t = rec.get("timings", {})
        if rec.get("round", 0) < 1 or "round" not in t:
            continue
        server = sum(t.get(k, 0.0) for k in SERVER)
        row = {k: round(t.get(k, 0.0), 3) for k in ("train", *SERVER, "eval")}
        rows.append({"round": rec["round"], **row, "wall": round(t["round"], 3), "server_share": server / t["round"]})
    if not rows:
        raise SystemExit(f"server_share: {run_dir}/metrics.jsonl has no round with timings['round'] (made by an older flexlora?)")
    total = {k: sum(r[k] for r in rows) for k in ("train", *SERVER, "eval", "wall")}
    return {"rounds": rows, "total_s": total, "server_share": sum(total[k] for k in SERVER) / total["wall"], "max_round_server_share": max(r["server_share"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="a finished run folder to read instead of running")
    ap.add_argument("--label", default="flexlora-heavy-tail-strong", help="the [[compare]] entry of configs/demo.toml to run")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "server_share.json")
    ap.add_argument("--note", default="", help="how the run was made (e.g. 'make demo in a clean clone, idle machine')")
    args = ap.parse_args(argv)
    env = environment()
    run_dir = args.run_dir
    t0 = time.perf_counter()
    if run_dir is None:
        run_dir = ROOT / "runs" / f"server_share-{time.strftime('%Y%m%d-%H%M%S')}"
        run_demo_entry(args.label, run_dir)
    run = args.label if args.run_dir is None else "/".join(Path(args.run_dir).resolve().parts[-3:])  # no machine paths
    result = {"environment": env, "run": run, "note": args.note, "target": 0.15, **share_of(run_dir)}
    result["wall_s"] = time.perf_counter() - t0
    import os

    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)
    for r in result["rounds"]:
        print(f"round {r['round']}: train {r['train']:.1f}s  aggregate {r['aggregate']:.1f}s  diagnostics {r['diagnostics']:.1f}s  checkpoint {r['checkpoint']:.1f}s  eval {r['eval']:.1f}s  round {r['wall']:.1f}s  server share {r['server_share']:.3f}")
    print(f"server share over the run: {result['server_share']:.3f} (target < 0.15) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
