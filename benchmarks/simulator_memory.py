"""Peak RSS of a tiny-model simulator run with 16 vs 1,613 clients (same clients per round).

Memory must not grow with the number of clients: one base model serves every client, an
adapter lives only while its client trains, and the server keeps one global state. Each
configuration runs in a fresh child process that reports its own peak RSS.

    python benchmarks/simulator_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, maxrss_mib, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(num_clients: int, rounds: int) -> None:
    from flexlora.config import load_config
    from flexlora.simulate import Simulation

    cfg = load_config(ROOT / "configs" / "smoke.toml", [f"data.suite_clients={num_clients}", f"federation.rounds={rounds}", "eval.at_start=false"])
    with tempfile.TemporaryDirectory() as tmp:
        summary = Simulation(cfg, Path(tmp) / "run", progress=False).run()
    print(json.dumps({"clients": num_clients, "train_clients": summary["train_clients"], "peak_rss_mib": maxrss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    if args.child:
        child(args.child, rounds)
        return
    rows = []
    for n in (16, 1613):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--rounds", str(rounds)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>5} clients ({row['train_clients']} training): peak RSS {row['peak_rss_mib']:.0f} MiB")
    growth = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"] - 1
    result = {
        "benchmark": "simulator_memory",
        "config": "configs/smoke.toml (tiny Llama, 4 clients per round)",
        "rounds": rounds,
        "rows": rows,
        "growth_fraction": growth,
        "target": "within 10%",
        "target_met": abs(growth) <= 0.10,
        "environment": environment(),
    }
    path = write_json(RESULTS_DIR / ("simulator_memory_quick.json" if args.quick else "simulator_memory.json"), result)
    print(f"growth {growth * 100:+.1f}% (target within 10%: {'met' if result['target_met'] else 'NOT met'}) -> {path}")


if __name__ == "__main__":
    main()
