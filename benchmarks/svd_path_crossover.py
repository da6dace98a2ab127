"""Where does the factored SVD stop beating the dense one? Measured against ``choose_path``.

``flexlora.lowrank.svd_of_product`` has two exact paths for the SVD of ``Bcat @ Acat``
(d_out x R times R x d_in): *factored* (two Householder QRs, one R-sized SVD, reflectors applied
to the kept vectors) and *dense* (form the product, LAPACK SVD). ``path="auto"`` picks by a flop
estimate. This script times both paths on real layer shapes over a range of stacked ranks R
and reports, per shape, the measured crossover and every R where ``choose_path`` picked the
slower path (and by how much).

    python benchmarks/svd_path_crossover.py                # SmolLM2-135M and 1.3B-style shapes
    python benchmarks/svd_path_crossover.py --quick        # SmolLM2 shapes, fewer ranks

Run it on an otherwise idle machine: both paths are compute-bound and share the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flexlora.lowrank import choose_path, estimated_flops, svd_of_product

RESULTS = Path(__file__).parent / "results" / "svd_path_crossover.json"
SHAPES = {
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama-1.3b": [(2048, 2048), (5504, 2048), (2048, 5504)],
}
RANKS_FULL = [32, 64, 128, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072]
RANKS_QUICK = [64, 256, 512, 768, 1024, 1536]


def time_path(Bcat: torch.Tensor, Acat: torch.Tensor, path: str, keep: int, repeats: int) -> float:
    svd_of_product(Bcat, Acat, path, keep)  # warm-up (LAPACK workspaces, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        svd_of_product(Bcat, Acat, path, keep)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, fewer ranks and repeats")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="the simulator's server default is float64")
    ap.add_argument("--keep", type=int, default=200, help="singular vectors kept (the largest rank handed out)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    models = {"smollm2-135m": SHAPES["smollm2-135m"]} if args.quick else SHAPES
    ranks = RANKS_QUICK if args.quick else RANKS_FULL
    repeats = 2 if args.quick else 3
    g = torch.Generator().manual_seed(0)
    rows = []
    for model, shapes in models.items():
        for d_out, d_in in shapes:
            for R in ranks:
                if R > 2 * max(d_out, d_in):
                    continue
                Bcat = torch.randn(d_out, R, generator=g, dtype=dtype) * 0.02
                Acat = torch.randn(R, d_in, generator=g, dtype=dtype) / d_in**0.5
                t_f = time_path(Bcat, Acat, "factored", args.keep, repeats)
                t_d = time_path(Bcat, Acat, "dense", args.keep, repeats)
                chosen = choose_path(d_out, d_in, R)
                faster = "factored" if t_f <= t_d else "dense"
                fl = estimated_flops(d_out, d_in, R)
                row = {
                    "model": model, "d_out": d_out, "d_in": d_in, "R": R,
                    "factored_s": round(t_f, 5), "dense_s": round(t_d, 5),
                    "flops_factored": fl["factored"], "flops_dense": fl["dense"],
                    "chosen": chosen, "faster": faster,
                    "slowdown_of_choice": round((t_f if chosen == "factored" else t_d) / min(t_f, t_d), 3),
                }
                rows.append(row)
                flag = "" if chosen == faster else f"  <- auto picks {chosen}: {row['slowdown_of_choice']:.2f}x slower"
                print(f"{model:13s} {d_out:5d}x{d_in:<5d} R={R:5d}  factored {t_f*1e3:8.1f} ms  dense {t_d*1e3:8.1f} ms{flag}")
    wrong = [r for r in rows if r["chosen"] != r["faster"]]
    worst = max((r["slowdown_of_choice"] for r in rows), default=1.0)
    print(f"\nauto picked the slower path in {len(wrong)} of {len(rows)} cases; worst slowdown {worst:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "dtype": args.dtype, "keep": args.keep, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "rows": rows, "wrong_choices": len(wrong), "worst_slowdown": worst,
    }, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
