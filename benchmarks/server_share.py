"""The server's share of a FlexLoRA round in ``make demo``: aggregation + diagnostics + checkpoint
over the round's wall time (local training, aggregation, diagnostics, evaluation, checkpoint).

Runs the FlexLoRA entry of ``configs/demo.toml`` (heavy-tail-strong, SmolLM2-135M, 4 rounds x 4
clients) in a fresh folder, or reads a finished one (``--run-dir runs/demo/flexlora-heavy-tail-strong``
after ``make demo``), and writes ``benchmarks/results/server_share.json``. Time it on an idle
machine: two CPU-heavy processes on two cores slow LAPACK down 50-80x.

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


def svd_floor(seed: int = 0) -> dict:
    """How much of a FlexLoRA aggregation at the demo's shapes is LAPACK's SVD itself: SmolLM2-135M's
    210 target modules, four clients at the demo's typical heavy-tail-strong ranks (200/200, 200/200,
    30/200, 8/8), synthetic factors; time inside ``torch.linalg.svd`` against the whole aggregation."""
    import torch

    from flexlora.methods import get_method
    from flexlora.update import ClientUpdate, LoraFactors

    shapes = {}
    for layer in range(30):
        for leaf, shape in {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                            "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}.items():
            shapes[f"model.layers.{layer}.{'self_attn' if leaf.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{leaf}"] = shape
    g = torch.Generator().manual_seed(seed)
    updates = []
    for k, (r_att, r_mlp) in enumerate([(200, 200), (200, 200), (30, 200), (8, 8)]):
        mods = {}
        for n, (o, i) in shapes.items():
            r = min(r_att if "self_attn" in n else r_mlp, o, i)
            mods[n] = LoraFactors(A=torch.randn(r, i, generator=g) * 0.02, B=torch.randn(o, r, generator=g) * 0.01, scale=16.0 / r)
        updates.append(ClientUpdate(str(k), 20 + k, mods))
    inside = [0.0]
    real_svd = torch.linalg.svd

    def timed_svd(*a, **kw):
        t = time.perf_counter()
        try:
            return real_svd(*a, **kw)
        finally:
            inside[0] += time.perf_counter() - t

    method = get_method("flexlora")
    method.aggregate(updates[:2])  # warm-up
    torch.linalg.svd = timed_svd
    try:
        t0 = time.perf_counter()
        state = method.aggregate(updates)
        total = time.perf_counter() - t0
    finally:
        torch.linalg.svd = real_svd
    paths = list(state.info["svd_paths"].values())
    return {"modules": len(shapes), "dense_path": paths.count("dense"), "factored_path": paths.count("factored"),
            "aggregate_s": total, "inside_linalg_svd_s": inside[0], "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, help="a finished run folder to read instead of running")
    ap.add_argument("--label", default="flexlora-heavy-tail-strong", help="the [[compare]] entry of configs/demo.toml to run")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "server_share.json")
    ap.add_argument("--svd-floor", action="store_true", help="also time how much of an aggregation at the demo's shapes is LAPACK's SVD")
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
    if args.svd_floor:
        result["svd_floor"] = svd_floor()
        f = result["svd_floor"]
        print(f"SVD floor: {f['inside_linalg_svd_s']:.1f} s of a {f['aggregate_s']:.1f} s aggregation inside torch.linalg.svd "
              f"({f['dense_path']} of {f['modules']} modules on the dense path)")
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
