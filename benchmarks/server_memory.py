"""The server's peak memory and time to close one FlexLoRA round, holding every update (before) vs
folding each as it arrives (after, flexlora.fold.RoundFold), at the paper's scale.

Synthetic updates at SmolLM2-135M's shapes (30 layers x 7 modules) and at LLaMA-1.3B's (24 x 7),
per-module ranks from the paper's resource types with the heavy-tail-strong mix (80% rank 200),
data sizes 16-520. One round's server side, as the round engine closes it:

* ``before``: every update generated and held, then today's path: ``screen_updates`` (validation +
  median norm screen), ``FlexLoRA.aggregate``, ``aggregation_report``.
* ``after``: each update generated, then added to a :class:`flexlora.fold.RoundFold` at once (held
  ones in a temporary file, as the simulator does), then ``settle``, ``aggregate``, ``report``.

Each configuration runs in its own child process, so its peak RSS (``ru_maxrss``) is its own; the
time excludes generating the updates. Before a child starts, MemAvailable is read and the
configuration is skipped (with the reason recorded) when its estimated peak would not leave 2 GiB.
Results accumulate in benchmarks/results/server_memory.json (rerun to fill in skipped ones).

A model name ``llama-1.3b@4`` takes its first 4 layers only: the per-module shapes are the model's,
memory and time scale with the number of layers (the full 1.3B round's final SVD alone takes longer
than a benchmark may hold the 2 shared cores).

    python benchmarks/server_memory.py [--models smollm2-135m,llama-1.3b@4] [--clients 10,40,80] [--paths before,after] [--timeout 450]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, maxrss_mib, write_json  # noqa: E402

OUT = RESULTS_DIR / "server_memory.json"
MODELS = {
    "smollm2-135m": {"hidden": 576, "intermediate": 1536, "kv": 192, "layers": 30},
    "llama-1.3b": {"hidden": 2048, "intermediate": 5504, "kv": 2048, "layers": 24},
}
GiB = 2**30


def shapes_of(model: str) -> dict[str, tuple[int, int]]:
    """``model`` is a key of MODELS, optionally ``@L`` for its first L layers only (time on 2 cores)."""
    model, _, layers = model.partition("@")
    m = dict(MODELS[model])
    if layers:
        m["layers"] = int(layers)
    h, i, kv = m["hidden"], m["intermediate"], m["kv"]
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                 "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{layer}.{n}": s for layer in range(m["layers"]) for n, s in per_layer.items()}


def federation(model: str, clients: int, seed: int = 0):
    """Per client: its per-module specs (heavy-tail-strong types) and its data size."""
    from flexlora.resources import PAPER_DISTRIBUTIONS, PAPER_TYPES, RankPolicy, assign_types

    shapes = shapes_of(model)
    types = assign_types(list(range(clients)), PAPER_DISTRIBUTIONS["heavy-tail-strong"], seed=seed)
    policy = RankPolicy(alpha=16.0)
    rng = random.Random(seed)
    return [(policy.module_ranks(PAPER_TYPES[types[c]], shapes)[0], rng.randint(16, 520)) for c in range(clients)], shapes


def estimate_gib(model: str, clients: int, path: str, keep_rank: int | None = None) -> dict[str, float]:
    specs, shapes = federation(model, clients)
    factors = sum(s.rank * sum(shapes[n]) for spec, _ in specs for n, s in spec.items()) * 4 / GiB
    dense = sum(a * b for a, b in shapes.values()) * 4 / GiB
    one = factors / clients
    # before: every update + the state (full rank: up to ~2x dense) + a module's stack (measured 22.7 GiB at
    # SmolLM2 x 40, 1.1x the factors; 1.4x at 80); after: the dense sums + the state + one update
    state = 2.0 * dense if keep_rank is None else sum(keep_rank * (a + b) for a, b in shapes.values()) * 4 / GiB
    peak = (1.15 * factors + 0.2 * dense + state + 0.6) if path == "before" else (1.3 * dense + state + 2 * one + 0.6)
    return {"factors_gib": factors, "dense_gib": dense, "estimated_peak_gib": peak}


def make_update(cid: int, spec, n: int, seed: int = 0):
    import torch

    from flexlora.update import ClientUpdate, LoraFactors

    g = torch.Generator().manual_seed(seed * 1_000_003 + cid)
    modules = {}
    for name, s in spec.items():
        d_out, d_in = SHAPES[name]
        modules[name] = LoraFactors(A=torch.randn(s.rank, d_in, generator=g) / d_in**0.5, B=torch.randn(d_out, s.rank, generator=g) * 1e-3, scale=s.scale)
    return ClientUpdate(str(cid), n, modules)


SHAPES: dict[str, tuple[int, int]] = {}


def child(model: str, clients: int, path: str, keep_rank: int | None) -> dict:
    import torch

    from flexlora.diagnostics import aggregation_report, summarise
    from flexlora.fold import DiskStash, RoundFold
    from flexlora.methods import get_method
    from flexlora.validate import ValidationConfig, screen_updates

    specs, shapes = federation(model, clients)
    SHAPES.update(shapes)
    method = get_method("flexlora", keep_rank=keep_rank)
    config = ValidationConfig()
    timings = {"generate": 0.0}
    t_round = time.perf_counter()
    if path == "before":
        t = time.perf_counter()
        updates = [make_update(c, spec, n) for c, (spec, n) in enumerate(specs)]
        timings["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        accepted, rejected = screen_updates(updates, shapes, None, config)
        timings["screen"] = time.perf_counter() - t
        t = time.perf_counter()
        state = method.aggregate(accepted, round=1)
        timings["aggregate"] = time.perf_counter() - t
        t = time.perf_counter()
        report = aggregation_report(state, accepted, [state.weights[u.client_id] for u in accepted], exact=method.exact_aggregate)
        timings["diagnostics"] = time.perf_counter() - t
        held_max = clients
    else:
        fold = RoundFold(method, shapes, config, [str(c) for c in range(clients)], stash=DiskStash())
        timings["fold"] = 0.0
        held_max = 0
        for c, (spec, n) in enumerate(specs):
            t = time.perf_counter()
            u = make_update(c, spec, n)
            timings["generate"] += time.perf_counter() - t
            t = time.perf_counter()
            fold.add(u)
            del u
            timings["fold"] += time.perf_counter() - t
            held_max = max(held_max, len(fold.held))
        t = time.perf_counter()
        accepted_ids, rejected = fold.settle()
        timings["settle"] = time.perf_counter() - t
        t = time.perf_counter()
        state = fold.aggregate(1)
        timings["aggregate"] = time.perf_counter() - t
        t = time.perf_counter()
        report = fold.report(state)
        timings["diagnostics"] = time.perf_counter() - t
    total = time.perf_counter() - t_round - timings["generate"]
    s = summarise(report)
    return {
        "model": model, "clients": clients, "path": path, "peak_rss_gib": round(maxrss_mib() / 1024, 3),
        "server_seconds": round(total, 2), "timings": {k: round(v, 2) for k, v in timings.items()},
        "rejected": len(rejected), "most_held": held_max, "stacked_rank_q0": sum(spec["model.layers.0.self_attn.q_proj"].rank for spec, _ in specs),
        "rel_error_vs_exact_mean": s["rel_error_vs_exact"], "threads": torch.get_num_threads(), "keep_rank": keep_rank,
        **{k: round(v, 3) for k, v in estimate_gib(model, clients, path, keep_rank).items()},
    }


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--clients", default="10,40,80")
    ap.add_argument("--paths", default="before,after")
    ap.add_argument("--timeout", type=int, default=450, help="seconds per configuration")
    ap.add_argument("--margin", type=float, default=2.0, help="GiB of MemAvailable to leave free")
    ap.add_argument("--keep-rank", type=int, default=None, help="FlexLoRA's keep_rank (None: the exact full-rank state)")
    ap.add_argument("--redo", action="store_true", help="run configurations already in the results file again")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, clients, path, keep = args.child.split(":")
        print(json.dumps(child(model, int(clients), path, int(keep) if keep else None)))
        return 0
    old = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    rows = {(r["model"], r["clients"], r["path"], r.get("keep_rank")): r for r in old.get("rows", [])}
    for model in args.models.split(","):
        for clients in map(int, args.clients.split(",")):
            for path in args.paths.split(","):
                key = (model, clients, path, args.keep_rank)
                if key in rows and "peak_rss_gib" in rows[key] and not args.redo:
                    continue
                est = estimate_gib(model, clients, path, args.keep_rank)
                avail = mem_available_gib()
                row = {"model": model, "clients": clients, "path": path, "keep_rank": args.keep_rank, "mem_available_gib_at_start": round(avail, 2), **{k: round(v, 3) for k, v in est.items()}}
                if est["estimated_peak_gib"] > avail - args.margin:
                    row["skipped"] = f"estimated peak {est['estimated_peak_gib']:.1f} GiB does not leave {args.margin:g} GiB of the {avail:.1f} GiB available"
                    print(f"{model} {clients:>3} clients {path:<6}: skipped ({row['skipped']})", flush=True)
                else:
                    t = time.perf_counter()
                    try:
                        out = subprocess.run([sys.executable, __file__, "--child", f"{model}:{clients}:{path}:{args.keep_rank or ''}"], capture_output=True, text=True, timeout=args.timeout)
                    except subprocess.TimeoutExpired:
                        row["skipped"] = f"did not finish within {args.timeout} s"
                    else:
                        if out.returncode != 0:
                            row["skipped"] = f"child failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}"
                        else:
                            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                    row["wall_seconds"] = round(time.perf_counter() - t, 1)
                    if "peak_rss_gib" in row:
                        print(f"{model} {clients:>3} clients {path:<6}: peak RSS {row['peak_rss_gib']:.2f} GiB (factors {row['factors_gib']:.1f}, dense {row['dense_gib']:.2f}), "
                              f"server {row['server_seconds']:.1f} s, most held {row['most_held']}", flush=True)
                    else:
                        print(f"{model} {clients:>3} clients {path:<6}: {row['skipped']}", flush=True)
                rows[key] = row
                write_json(OUT, {"benchmark": "server_memory", "method": "flexlora", "distribution": "heavy-tail-strong",
                                 "note": __doc__.split("\n\n")[1].replace("\n", " "), "rows": sorted(rows.values(), key=lambda r: (r["model"], r.get("keep_rank") or 0, r["clients"], r["path"])),
                                 "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
