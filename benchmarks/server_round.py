"""The server's half of one FlexLoRA round at the demo's shapes, without training: where its seconds go.

SmolLM2-135M-Instruct's 210 LoRA modules (30 layers x q/k/v/o/gate/up/down), clients with
synthetic factors at the heavy-tail-strong ranks of ``make demo``'s rounds: ``4x200`` (rounds 2
and 3 of the demo, every module on the dense path) and ``mixed`` (200, 200, 30, 8: rounds 1 and 4).
Each part is timed as the round engine runs it: the update screen, the aggregation, the
diagnostics, and the checkpoint (the part the loop waits for, and the write behind it).
The median of ``--repeats`` runs per part. Time it on an idle machine (two CPU-heavy processes
on 2 cores slow LAPACK 50-80x); the load average is saved with the figures.

    python benchmarks/server_round.py [--repeats 3] [--variants] [--out benchmarks/results/server_round.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

COMPOSITIONS = {"4x200": [(200, 200)] * 4, "mixed": [(200, 200), (200, 200), (30, 200), (8, 8)]}


def demo_shapes() -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(30):
        for leaf, shape in {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                            "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}.items():
            block = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            shapes[f"model.layers.{layer}.{block}.{leaf}"] = shape
    return shapes


def synthetic_updates(shapes, ranks, seed: int = 0):
    import torch

    from flexlora.update import ClientUpdate, LoraFactors

    g = torch.Generator().manual_seed(seed)
    updates = []
    for k, (r_att, r_mlp) in enumerate(ranks):
        mods = {}
        for n, (o, i) in shapes.items():
            r = min(r_att if "self_attn" in n else r_mlp, o, i)
            mods[n] = LoraFactors(A=torch.randn(r, i, generator=g) * 0.02, B=torch.randn(o, r, generator=g) * 0.01, scale=16.0 / r)
        updates.append(ClientUpdate(str(k), 20 + k, mods))
    return updates


def one_round(shapes, updates, folder: Path) -> dict[str, float]:
    """Screen, aggregate, diagnose and checkpoint as ``RoundEngine.close`` and the simulator do."""
    from flexlora.checkpoint import CheckpointWriter, state_to_dict
    from flexlora.diagnostics import aggregation_report, summarise
    from flexlora.methods import get_method
    from flexlora.update import GlobalModule
    from flexlora.validate import ValidationConfig, screen_updates

    method = get_method("flexlora")
    t0 = time.perf_counter()
    accepted, rejected = screen_updates(updates, shapes, None, ValidationConfig(norm_factor=10.0))
    assert not rejected, rejected
    t1 = time.perf_counter()
    state = method.aggregate(accepted, round=1)
    t2 = time.perf_counter()
    ranks = {n: sorted({u.modules[n].rank for u in accepted}) for n in shapes}
    report = aggregation_report(state, accepted, [state.weights[u.client_id] for u in accepted], ranks, exact=True)
    summarise(report)
    t3 = time.perf_counter()
    def payload() -> dict:  # as RoundEngine.checkpoint_state between rounds: only the triplets some client can be served (200 here)
        cut = {n: GlobalModule(A=gm.A[:200].clone(), B=gm.B[:, :200].clone(), spectrum=gm.spectrum) if gm.rank > 200 else gm
               for n, gm in state.adapter.items()}
        return {"round": 1, "state": state_to_dict(replace(state, adapter=cut))}

    writer = CheckpointWriter(folder)
    writer.start(payload)
    t4 = time.perf_counter()
    writer.wait()
    t5 = time.perf_counter()
    return {"screen": t1 - t0, "aggregate": t2 - t1, "diagnostics": t3 - t2, "checkpoint": t4 - t3, "checkpoint_behind": t5 - t4,
            "dense_path": list(state.info["svd_paths"].values()).count("dense")}


def aggregation_variants(shapes, updates, repeats: int) -> dict[str, float]:
    """The aggregation alone, median seconds, as built (float64 Gram route, modules two at a time on one
    thread each) and with each of the two taken back: a plain loop over modules, and LAPACK's float32
    SVD (``torch.linalg.svd``, the route before) in a plain loop."""
    import torch

    import flexlora.lowrank as lowrank
    import flexlora.methods.flexlora as flexlora_module
    from flexlora.methods import get_method

    def lapack(M, keep):
        if M.shape[0] < M.shape[1]:
            V, S, Uh = torch.linalg.svd(M.T, full_matrices=False)
            return Uh[:keep].T, S, V[:, :keep].T
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :keep], S, Vh[:keep]

    def median_seconds() -> float:
        method, times = get_method("flexlora"), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            method.aggregate(updates)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    built_map, built_svd = flexlora_module.map_modules, lowrank.thin_svd
    out = {"gram_parallel": median_seconds()}
    try:
        flexlora_module.map_modules = lambda fn, items, device="cpu": [fn(x) for x in items]
        out["gram_loop"] = median_seconds()
        lowrank.thin_svd = lapack
        out["lapack_loop"] = median_seconds()
    finally:
        flexlora_module.map_modules, lowrank.thin_svd = built_map, built_svd
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "server_round.json")
    ap.add_argument("--note", default="")
    ap.add_argument("--variants", action="store_true", help="also time the aggregation without the thread pool and with LAPACK's SVD")
    args = ap.parse_args(argv)
    import torch

    env = environment()
    shapes = demo_shapes()
    result = {"environment": env, "note": args.note, "modules": len(shapes), "threads": torch.get_num_threads(), "compositions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, ranks in COMPOSITIONS.items():
            updates = synthetic_updates(shapes, ranks)
            runs = [one_round(shapes, updates, Path(tmp) / f"{label}-{i}") for i in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            med["server_s"] = med["screen"] + med["aggregate"] + med["diagnostics"] + med["checkpoint"]
            result["compositions"][label] = {"ranks": ranks, "median_s": med, "runs": runs}
            print(f"{label:6s} screen {med['screen']:.2f}s  aggregate {med['aggregate']:.2f}s  diagnostics {med['diagnostics']:.2f}s  "
                  f"checkpoint {med['checkpoint']:.2f}s (+{med['checkpoint_behind']:.2f}s behind)  server {med['server_s']:.2f}s  "
                  f"({med['dense_path']:.0f} of {len(shapes)} modules dense)")
    if args.variants:
        v = aggregation_variants(shapes, synthetic_updates(shapes, COMPOSITIONS["4x200"]), args.repeats)
        result["aggregation_variants_4x200_s"] = v
        print(f"aggregation (4x200): as built {v['gram_parallel']:.2f}s, plain loop {v['gram_loop']:.2f}s, "
              f"LAPACK float32 SVD in a plain loop {v['lapack_loop']:.2f}s")
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
