"""Same config and seed, idle and with every core loaded: are the written adapters byte-identical?

Runs a tiny configuration several times in one process, alternating an idle machine with one busy-loop
process per core beside the run (started and killed here by PID), and digests every ``final/`` adapter
file. ``--unpinned`` replaces the server's module map by the one flexlora had before each worker pinned
its thread counts (a fresh worker thread kept the machine's default OpenMP/MKL counts until its first
parallel op), to show the difference the pin makes.

    python benchmarks/determinism_load.py [--runs 3] [--unpinned] [--wide]

Take it under the CPU lock (it loads the cores on purpose).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

import flexlora.diagnostics as diagnostics  # noqa: E402
import flexlora.methods.flexlora as flexlora_method  # noqa: E402
import flexlora.validate as validate  # noqa: E402
from flexlora.cli import main as flexlora_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["federation.rounds=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]
WIDE = ["model.tiny={hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2}"]


def unpinned_map_modules(fn, items, device="cpu"):
    """flexlora's module map before the pin (commit 18f981b): workers never set their own thread counts."""
    items = list(items)
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if torch.device(device).type != "cpu" or workers <= 1:
        return [fn(x) for x in items]
    torch.set_num_threads(threads // workers)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def final_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((out / "final").rglob("*.safetensors")):
        h.update(p.relative_to(out).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="idle/loaded pairs")
    ap.add_argument("--unpinned", action="store_true", help="the module map from before the pin")
    ap.add_argument("--wide", action="store_true", help="a 256-wide tiny model instead of the 64-wide one")
    args = ap.parse_args()
    if args.unpinned:
        flexlora_method.map_modules = diagnostics.map_modules = validate.map_modules = unpinned_map_modules
    overrides = FAST + (WIDE if args.wide else [])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for loaded in (False, True):
                out = Path(tmp) / f"run{i}-{'loaded' if loaded else 'idle'}"
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)] if loaded else []
                t0 = time.perf_counter()
                try:
                    sets = sum((["--set", s] for s in overrides), [])
                    code = flexlora_main(["run", "--config", str(ROOT / "configs" / "smoke.toml"), "--out", str(out), "--quiet", *sets])
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
                assert code == 0
                runs.append({"loaded": loaded, "digest": final_digest(out), "seconds": round(time.perf_counter() - t0, 2)})
                print(f"run {i} {'loaded' if loaded else 'idle  '} {runs[-1]['digest']} {runs[-1]['seconds']:.1f}s", flush=True)
    idle = Counter(r["digest"] for r in runs if not r["loaded"])
    reference = idle.most_common(1)[0][0]
    result = {
        "env": environment(),
        "config": "configs/smoke.toml",
        "overrides": overrides,
        "module_map": "unpinned (before)" if args.unpinned else "pinned (now)",
        "hogs": os.cpu_count(),
        "runs": runs,
        "distinct_digests": len({r["digest"] for r in runs}),
        "idle_differing_from_idle_majority": sum(r["digest"] != reference for r in runs if not r["loaded"]),
        "loaded_differing_from_idle_majority": sum(r["digest"] != reference for r in runs if r["loaded"]),
    }
    name = f"determinism_load{'_wide' if args.wide else ''}{'_unpinned' if args.unpinned else ''}.json"
    path = write_json(RESULTS_DIR / name, result)
    print(
        f"{result['module_map']}: {result['distinct_digests']} distinct final/ digests in {len(runs)} runs; "
        f"loaded runs differing from the idle ones: {result['loaded_differing_from_idle_majority']} of {args.runs} -> {path}"
    )


if __name__ == "__main__":
    main()
