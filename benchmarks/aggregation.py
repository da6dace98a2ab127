"""Server-side aggregation benchmark: FlexLoRA's factored SVD against the dense reference.

What is compared, per LoRA module:

* **ours**: ``flexlora.methods.FlexLoRA().aggregate(updates)`` (``svd_path="auto"``) followed by
  ``share_for`` for every client. When the stacked rank R = sum_k r_k is below the layer width,
  this never forms the d_out x d_in update (two thin QRs + one small SVD, see flexlora.lowrank).
* **dense**: what the official FlexLoRA release does: dW = sum_k p_k s_k B_k A_k formed densely
  (one ``addmm_`` per client into a float32 accumulator), ``torch.linalg.svd(dW,
  full_matrices=False)``, then per client B = U_r S_r / s_r, A = Vh_r.

Both run in the same process, in float32, with the same torch thread count. Clients are
synthetic adapters at the shapes of LLaMA-2-7B (hidden 4096, intermediate 11008, 32 layers) and
of a LLaMA-1.3B-style model (hidden 2048, intermediate 5504, 24 layers, as Data-Juicer's
LLaMA-1.3B used by the paper), LoRA on q,k,v,o,gate,up,down. Each client's resource type is
drawn uniformly from the paper's four types (attention rank / MLP rank: 8/8, 30/30, 30/200,
200/200) with a fixed seed; alpha = 16, scale = alpha / r; A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))
(PEFT's init), B ~ N(0, 0.02^2) (non-zero, as after training); data sizes n_k ~ U{16..520}.

One module of each distinct shape is timed; whole-model times are an **extrapolation**
(sum over the model's modules of its shape's median time), not a measurement.

Peak memory: each path runs once more in a fresh ``spawn`` child; reported is
``ru_maxrss`` after the path minus ``ru_maxrss`` after imports, input creation and a LAPACK
warm-up (MiB).

    python benchmarks/aggregation.py            # full: 7B and 1.3B shapes (several minutes)
    python benchmarks/aggregation.py --quick    # 1.3B shapes, fewer repeats (< 1 minute)
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, current_rss_mib, environment, maxrss_mib, write_json  # noqa: E402

from flexlora import lowrank  # noqa: E402
from flexlora.methods import FlexLoRA  # noqa: E402
from flexlora.methods.base import scaled_factors  # noqa: E402
from flexlora.update import (  # noqa: E402
    ClientUpdate,
    LoraFactors,
    ModuleSpec,
    check_compatible,
    data_size_weights,
)

ALPHA = 16.0
DTYPE = torch.float32
# The paper's resource types: (rank on attention modules, rank on MLP modules).
RESOURCE_TYPES: dict[int, tuple[int, int]] = {1: (8, 8), 2: (30, 30), 3: (30, 200), 4: (200, 200)}

MODELS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "note": "LLaMA-2-7B (no GQA)"},
    "llama-1.3b": {
        "hidden": 2048,
        "intermediate": 5504,
        "layers": 24,
        "note": "LLaMA-1.3B style (Data-Juicer LLaMA-1.3B as in the paper): hidden 2048, intermediate 5504, 24 layers",
    },
}

TARGET_SPEEDUP = 20.0
TARGET_REL_ERROR = 1e-4
# "never slower than dense when R >= width": the median paired ratio time(auto)/time(dense) may
# exceed 1 by at most this fraction (timing noise on a shared 2-core machine); the strict result is
# reported alongside.
NOT_SLOWER_TOLERANCE = 0.05


# ---------------------------------------------------------------------------------------------
# synthetic clients
# ---------------------------------------------------------------------------------------------
def draw_clients(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Resource types (uniform over the 4 types) and training-set sizes, from one fixed seed."""
    rng = random.Random(seed)
    types = [rng.choice(sorted(RESOURCE_TYPES)) for _ in range(n)]
    sizes = [rng.randint(16, 520) for _ in range(n)]
    return types, sizes


def shape_groups(model: str) -> list[dict[str, Any]]:
    m = MODELS[model]
    h, i, L = m["hidden"], m["intermediate"], m["layers"]
    return [
        {"key": f"{h}x{h}", "d_out": h, "d_in": h, "kind": "attn", "modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "count": 4 * L},
        {"key": f"{i}x{h}", "d_out": i, "d_in": h, "kind": "mlp", "modules": ["gate_proj", "up_proj"], "count": 2 * L},
        {"key": f"{h}x{i}", "d_out": h, "d_in": i, "kind": "mlp", "modules": ["down_proj"], "count": L},
    ]


def make_updates(
    name: str, d_out: int, d_in: int, ranks: Sequence[int], sizes: Sequence[int], seed: int
) -> tuple[list[ClientUpdate], list[dict[str, ModuleSpec]]]:
    """One module per client; generated in place (no temporaries larger than one factor)."""
    updates, specs = [], []
    bound = 1.0 / math.sqrt(d_in)
    for k, (r, n) in enumerate(zip(ranks, sizes)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + d_out * 7919 + d_in * 31 + k)
        A = torch.rand(r, d_in, generator=g, dtype=DTYPE).mul_(2 * bound).sub_(bound)
        B = torch.randn(d_out, r, generator=g, dtype=DTYPE).mul_(0.02)
        updates.append(ClientUpdate(client_id=f"client{k}", num_examples=int(n), modules={name: LoraFactors(A=A, B=B, scale=ALPHA / r)}))
        specs.append({name: ModuleSpec(rank=r, alpha=ALPHA)})
    return updates, specs


# ---------------------------------------------------------------------------------------------
# the two paths
# ---------------------------------------------------------------------------------------------
def run_ours(updates: list[ClientUpdate], specs: list[dict[str, ModuleSpec]], svd_path: str = "auto", keep_rank: int | None = None):
    """``keep_rank=None``: the exact global update (every triplet); an int: what a server that
    hands out ranks up to ``keep_rank`` needs (the top triplets only, all singular values)."""
    method = FlexLoRA(svd_path=svd_path, keep_rank=keep_rank)
    state = method.aggregate(updates)
    shares = [method.share_for(state, s) for s in specs]
    return state, shares


def run_dense(updates: list[ClientUpdate], name: str, steps: dict[str, float] | None = None, transpose_wide: bool = False):
    """The official release's server step: dense dW, full thin SVD, truncation per client.

    ``steps``, when given, receives the time of each step (three perf_counter reads, no sync needed on CPU)."""
    clock = time.perf_counter
    t0 = clock()
    p = data_size_weights(updates)
    f0 = updates[0].modules[name]
    dW = torch.zeros(f0.d_out, f0.d_in, dtype=DTYPE)
    for u, w in zip(updates, p):
        f = u.modules[name]
        dW.addmm_(f.B.to(DTYPE), f.A.to(DTYPE), alpha=w * f.scale)
    t1 = clock()
    if transpose_wide and f0.d_out < f0.d_in:  # not what the official code does; MKL's gesdd is ~2x faster on tall input
        V, S, Uh = torch.linalg.svd(dW.T, full_matrices=False)
        U, Vh = Uh.T, V.T
    else:
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    del dW
    t2 = clock()
    shares = []
    for u in updates:
        f = u.modules[name]
        r = f.rank
        shares.append(LoraFactors(A=Vh[:r].contiguous(), B=(U[:, :r] * S[:r] / f.scale).contiguous(), scale=f.scale))
    if steps is not None:
        steps.clear()
        steps["form dW (addmm per client)"] = t1 - t0
        steps[f"svd ({f0.d_out}x{f0.d_in})"] = t2 - t1
        steps["truncate per client"] = clock() - t2
        steps["total"] = clock() - t0
    return S, shares


def _lapack_warmup() -> None:
    x = torch.randn(64, 48)
    torch.linalg.qr(x)
    torch.linalg.svd(x, full_matrices=False)
    x @ x.T


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------
# profile of the factored path, step by step (mirrors flexlora.lowrank.svd_of_product)
# ---------------------------------------------------------------------------------------------
def profile_ours(updates: list[ClientUpdate], specs, name: str, prototype: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Per-step times of one run of the chosen path, and extra timings that are not part of it."""
    t: dict[str, float] = {}
    extra: dict[str, float] = {}
    clock = time.perf_counter
    t0 = clock()
    check_compatible(updates)
    p = data_size_weights(updates)
    t["validate (check_compatible)"] = clock() - t0
    t0 = clock()
    Bs, As = zip(*(scaled_factors(u, name, DTYPE) for u in updates))
    Bcat, Acat = lowrank.stack_factors(Bs, As, p, DTYPE)
    t["stack factors"] = clock() - t0
    d_out, R = Bcat.shape
    d_in = Acat.shape[1]
    path = lowrank.choose_path(d_out, d_in, R)
    k = min(R, d_out, d_in)
    if path == "factored":
        t0 = clock()
        Qb, Rb = torch.linalg.qr(Bcat, mode="reduced")
        t[f"qr B ({d_out}x{R})"] = clock() - t0
        t0 = clock()
        Qa, Ra = torch.linalg.qr(Acat.T, mode="reduced")
        t[f"qr A^T ({d_in}x{R})"] = clock() - t0
        t0 = clock()
        M = Rb @ Ra.T
        t["core product Rb Ra^T"] = clock() - t0
        t0 = clock()
        Um, S, Vmh = torch.linalg.svd(M, full_matrices=False)
        t[f"small svd ({M.shape[0]}x{M.shape[1]})"] = clock() - t0
        t0 = clock()
        U = Qb @ Um[:, :k]
        Vh = Vmh[:k] @ Qa.T
        t["rotate back (Qb Um, Vm^T Qa^T)"] = clock() - t0
        kmax = max(s[name].rank for s in specs)
        t0 = clock()
        Qb @ Um[:, :kmax]
        Vmh[:kmax] @ Qa.T
        extra[f"rotate back top-{kmax} only (not used by ours; what keep_rank could save)"] = clock() - t0
        if prototype:
            t0 = clock()
            _prototype_geqrf_ormqr(Bcat, Acat, kmax)
            extra[f"prototype: geqrf + small svd + ormqr for top-{kmax} (whole SVD, suggested lowrank change)"] = clock() - t0  # noqa: E501
    else:
        t0 = clock()
        M = Bcat @ Acat
        t["dense product Bcat Acat"] = clock() - t0
        t0 = clock()
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
        t[f"dense svd ({d_out}x{d_in})"] = clock() - t0
    t0 = clock()
    Bg, Ag = (U * S).contiguous(), Vh.contiguous()
    t["global B, A (contiguous)"] = clock() - t0
    t0 = clock()
    for s in specs:
        spec = s[name]
        Bg[:, : spec.rank] / spec.scale
        Ag[: spec.rank].contiguous()
    t["shares (slice, divide)"] = clock() - t0
    t["total"] = sum(t.values())
    return t, extra


def _prototype_geqrf_ormqr(Bcat: torch.Tensor, Acat: torch.Tensor, keep: int):
    """Not used by ours: the factored SVD keeping only the top ``keep`` triplets, with Householder
    QR (geqrf) and ``ormqr`` instead of forming Qb, Qa explicitly (timed as a suggestion)."""
    hb, taub = torch.geqrf(Bcat)
    ha, taua = torch.geqrf(Acat.T)
    kb, ka = min(Bcat.shape), min(Acat.shape)
    Um, S, Vmh = torch.linalg.svd(hb[:kb].triu() @ ha[:ka].triu().T, full_matrices=False)
    keep = min(keep, S.shape[0])
    Ub = Bcat.new_zeros(Bcat.shape[0], keep)
    Ub[:kb] = Um[:, :keep]
    Va = Acat.new_zeros(Acat.shape[1], keep)
    Va[:ka] = Vmh[:keep].T
    return torch.ormqr(hb, taub, Ub), S[:keep], torch.ormqr(ha, taua, Va).T


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------
def _delta64(f: LoraFactors) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())


def accuracy(updates, name, ranks, state, shares_ours, S_dense, shares_dense, with_float64: bool = True) -> dict[str, Any]:
    """Share deltas of ours vs dense (per distinct client rank; clients of one rank get the same share),
    both also against a float64 reference (the exact factored SVD run in float64) unless
    ``with_float64`` is False (--quick), and spectra."""
    truth = None
    if with_float64:
        p = data_size_weights(updates)
        Bs, As = zip(*(scaled_factors(u, name, torch.float64) for u in updates))
        truth = lowrank.svd_of_sum(Bs, As, p, path="factored", dtype=torch.float64)

    def fro(x: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(x))

    per_rank: dict[str, dict[str, float | None]] = {}
    first_of_rank: dict[int, int] = {}
    for idx, r in enumerate(ranks):
        first_of_rank.setdefault(r, idx)
    for r, idx in sorted(first_of_rank.items()):
        d_ours = _delta64(shares_ours[idx][name])
        d_dense = _delta64(shares_dense[idx])
        row: dict[str, float | None] = {"ours_vs_dense": fro(d_ours - d_dense) / fro(d_dense), "ours_vs_float64": None, "dense_vs_float64": None}
        if truth is not None:
            d_true = truth.reconstruct(r)
            nt = fro(d_true)
            row["ours_vs_float64"] = fro(d_ours - d_true) / nt
            row["dense_vs_float64"] = fro(d_dense - d_true) / nt
            del d_true
        per_rank[str(r)] = row
        del d_ours, d_dense
    S_ours = state.adapter[name].spectrum.double()
    k = S_ours.shape[0]
    S_d = S_dense[:k].double()
    S_t = truth.S[:k] if truth is not None else None
    r_max = max(ranks)
    S_ref = S_t if S_t is not None else S_ours

    def rel_top(a, b):
        return None if a is None or b is None else float((a - b).abs().max() / b[0])

    def rel_each(a, b, n):
        return None if a is None or b is None else float(((a[:n] - b[:n]).abs() / b[:n]).max())

    gaps = {str(r): float((S_ref[r - 1] - S_ref[r]) / S_ref[0]) for r in sorted(set(ranks)) if r < S_ref.shape[0]}

    def worst(key: str):
        vals = [v[key] for v in per_rank.values() if v[key] is not None]
        return max(vals) if vals else None

    return {
        "max_rel_error": worst("ours_vs_dense"),
        "share_rel_error_by_rank": per_rank,
        "max_rel_error_ours_vs_float64": worst("ours_vs_float64"),
        "max_rel_error_dense_vs_float64": worst("dense_vs_float64"),
        "singular_values": {
            "compared": k,
            "ours_vs_dense_max_abs_err_over_s1": rel_top(S_ours, S_d),
            f"ours_vs_dense_max_rel_err_top{r_max}": rel_each(S_ours, S_d, r_max),
            "ours_vs_float64_max_abs_err_over_s1": rel_top(S_ours, S_t),
            "dense_vs_float64_max_abs_err_over_s1": rel_top(S_d, S_t),
            f"ours_vs_float64_max_rel_err_top{r_max}": rel_each(S_ours, S_t, r_max),
            f"dense_vs_float64_max_rel_err_top{r_max}": rel_each(S_d, S_t, r_max),
            "s1": float(S_ref[0]),
            "s_min_of_R": float(S_ref[-1]),
            "dense_tail_beyond_R_max_over_s1": float(S_dense[k:].max() / S_dense[0]) if S_dense.shape[0] > k else None,
            "gap_at_truncation_over_s1": gaps,
        },
    }


# ---------------------------------------------------------------------------------------------
# peak memory in fresh child processes
# ---------------------------------------------------------------------------------------------
def _vm_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB (Linux /proc/self/status)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mem_child(conn, which: str, name: str, d_out: int, d_in: int, ranks, sizes, seed: int, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        updates, specs = make_updates(name, d_out, d_in, ranks, sizes, seed)
        _lapack_warmup()
        gc.collect()
        base = maxrss_mib()
        base_rss = current_rss_mib()
        hwm_reset = _reset_hwm()
        base_status = _vm_status()
        t0 = time.perf_counter()
        if which == "ours":
            out = run_ours(updates, specs)
        else:
            out = run_dense(updates, name)
        dt = time.perf_counter() - t0
        peak = maxrss_mib()
        peak_status = _vm_status()
        inputs = sum((f.A.numel() + f.B.numel()) * f.A.element_size() for u in updates for f in u.modules.values())
        del out
        res = {
            "ru_maxrss_delta_mib": peak - base,
            "baseline_maxrss_mib": base,
            "baseline_rss_mib": base_rss,
            "peak_maxrss_mib": peak,
            # ru_maxrss survives fork+exec: a spawned child starts with the parent's RSS at spawn time as
            # its maxrss, which can hide the child's own peak. VmHWM is per address space (fresh after exec)
            # and is reset to the current RSS just before the path runs, so it is the clean measurement.
            "ru_maxrss_baseline_inherited": base > base_rss + 1.0,
            "hwm_reset": hwm_reset,
            "vmhwm_delta_mib": (peak_status["VmHWM"] - base_status["VmRSS"]) if hwm_reset and peak_status and base_status else None,
            "inputs_mib": inputs / 2**20,
            "time_s_in_child_not_a_benchmark": dt,  # the two children of a shape run concurrently
            "threads": torch.get_num_threads(),
        }
        res["peak_minus_baseline_mib"] = res["vmhwm_delta_mib"] if res["vmhwm_delta_mib"] is not None else res["ru_maxrss_delta_mib"]
        res["method"] = "VmHWM (reset via /proc/self/clear_refs) - VmRSS at reset" if res["vmhwm_delta_mib"] is not None else "ru_maxrss delta"
        conn.send(res)
    except BaseException as e:  # report instead of hanging the parent
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def measure_peaks(name: str, d_out: int, d_in: int, ranks, sizes, seed: int) -> dict[str, dict[str, Any]]:
    """Peak memory of each path, each in its own fresh spawn child (the two children run at the same
    time: memory does not depend on CPU contention, and nothing is timed meanwhile)."""
    ctx = mp.get_context("spawn")
    running = {}
    for which in ("ours", "dense"):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_mem_child, args=(send, which, name, d_out, d_in, list(ranks), list(sizes), seed, torch.get_num_threads()))
        proc.start()
        send.close()
        running[which] = (proc, recv)
    out = {}
    for which, (proc, recv) in running.items():
        try:
            res = recv.recv()
        except EOFError:
            res = {"error": "child exited without a result"}
        proc.join()
        res["exitcode"] = proc.exitcode
        out[which] = res
    return out


# ---------------------------------------------------------------------------------------------
# benchmark cases
# ---------------------------------------------------------------------------------------------
def shape_case(grp: dict[str, Any], types: list[int]) -> tuple[str, list[int]]:
    """The module name and the clients' ranks at one shape group (attention or MLP rank of each type)."""
    ranks = [RESOURCE_TYPES[t][0 if grp["kind"] == "attn" else 1] for t in types]
    return f"model.layers.0.{grp['modules'][0]}", ranks


def bench_shape(
    model: str, grp: dict[str, Any], types: list[int], sizes: list[int], cfg: dict[str, Any], mem: dict[str, Any], log
) -> dict[str, Any]:
    d_out, d_in = grp["d_out"], grp["d_in"]
    name, ranks = shape_case(grp, types)
    R = sum(ranks)
    updates, specs = make_updates(name, d_out, d_in, ranks, sizes, cfg["seed"])
    load_before = os.getloadavg()[0]

    log(f"  {model} {grp['key']} ({'/'.join(grp['modules'])}), R={R}: ours x{cfg['repeats_ours']} ...")
    if cfg["warmup"]:
        run_ours(updates, specs)  # warm-up (not timed)
    t_ours = []
    for _ in range(cfg["repeats_ours"]):
        dt, (state, shares_ours) = timed(lambda: run_ours(updates, specs))
        t_ours.append(dt)
    path = state.info["svd_paths"][name]
    r_max = max(ranks)
    t_serving = []
    for _ in range(cfg["repeats_ours"]):
        dt, (state_s, shares_s) = timed(lambda: run_ours(updates, specs, keep_rank=r_max))
        t_serving.append(dt)

    log(f"  {model} {grp['key']}: dense x{cfg['repeats_dense']} ...")
    t_dense = []
    prof_dense: dict[str, float] = {}
    for _ in range(cfg["repeats_dense"]):
        dt, (S_dense, shares_dense) = timed(lambda: run_dense(updates, name, prof_dense))
        t_dense.append(dt)

    t_dense_t = None
    if cfg["dense_transposed"] and d_out < d_in:
        log(f"  {model} {grp['key']}: dense with the SVD taken of dW^T (information) ...")
        t_dense_t, _ = timed(lambda: run_dense(updates, name, transpose_wide=True))

    log(f"  {model} {grp['key']}: profile, accuracy ...")
    prof_ours, prof_extra = profile_ours(updates, specs, name, prototype=cfg["prototype"])
    acc = accuracy(updates, name, ranks, state, shares_ours, S_dense, shares_dense, with_float64=cfg["float64_reference"])
    acc_serving = accuracy(updates, name, ranks, state_s, shares_s, S_dense, shares_dense, with_float64=False)
    del shares_dense, S_dense, shares_ours, state, shares_s, state_s
    gc.collect()

    med_o, med_d = statistics.median(t_ours), statistics.median(t_dense)
    flops = lowrank.estimated_flops(d_out, d_in, R)
    return {
        "model": model,
        "shape": grp["key"],
        "d_out": d_out,
        "d_in": d_in,
        "modules": grp["modules"],
        "modules_per_model": grp["count"],
        "client_ranks": ranks,
        "R": R,
        "width": min(d_out, d_in),
        "path_chosen": path,
        "estimated_flops": flops,
        "time_ours_s": med_o,
        "time_dense_s": med_d,
        "times_ours_s": t_ours,
        "times_dense_s": t_dense,
        "speedup_vs_dense": med_d / med_o,
        "speedup_vs_dense_of_mins": min(t_dense) / min(t_ours),
        "time_ours_serving_s": statistics.median(t_serving),
        "speedup_vs_dense_serving": med_d / statistics.median(t_serving),
        "max_rel_error_serving": acc_serving["max_rel_error"],
        "serving_keep_rank": r_max,
        "time_dense_svd_of_transpose_s": t_dense_t,
        "speedup_vs_dense_svd_of_transpose": (t_dense_t / med_o) if t_dense_t else None,
        "flops_dense_over_factored": flops["dense"] / flops["factored"],
        "max_rel_error": acc.pop("max_rel_error"),
        **acc,
        "peak_mem_mib_ours": mem.get("ours", {}).get("peak_minus_baseline_mib"),
        "peak_mem_mib_dense": mem.get("dense", {}).get("peak_minus_baseline_mib"),
        "memory_children": mem,
        "dense_lower_bound_mib": 4 * (d_out * d_in + (d_out + d_in) * min(d_out, d_in)) / 2**20,
        "profile_ours_s": prof_ours,
        "profile_ours_extra_s": prof_extra,
        "profile_dense_s": prof_dense,
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


def bench_wide_rank(cfg: dict[str, Any], log) -> list[dict[str, Any]]:
    """R >= layer width: a narrow 576 x 1536 layer (SmolLM2-135M's down_proj) with rank-200 clients."""
    d_out, d_in = 576, 1536
    name = "model.layers.0.mlp.down_proj"
    out = []
    for n_clients in cfg["wide_clients"]:
        ranks = [200] * n_clients
        sizes = draw_clients(n_clients, cfg["seed"] + 1)[1]
        updates, specs = make_updates(name, d_out, d_in, ranks, sizes, cfg["seed"])
        R = sum(ranks)
        log(f"  R >= width: {d_out}x{d_in}, {n_clients} x rank 200 (R={R}) ...")
        variants: dict[str, Callable[[], Any]] = {
            "auto": lambda: run_ours(updates, specs, "auto"),
            "dense_reference": lambda: run_dense(updates, name),
            "factored_forced": lambda: run_ours(updates, specs, "factored"),
        }
        for fn in variants.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        outs: dict[str, Any] = {}
        for rep in range(cfg["wide_repeats"]):  # interleaved, rotating order, to share load drift fairly
            for key in order[rep % 3:] + order[: rep % 3]:
                dt, outs[key] = timed(variants[key])
                times[key].append(dt)
        state_auto, shares_auto = outs["auto"]
        _, shares_dense = outs["dense_reference"]
        _, shares_fact = outs["factored_forced"]
        err = max(
            float(torch.linalg.matrix_norm(_delta64(shares_auto[i][name]) - _delta64(shares_dense[i])) / torch.linalg.matrix_norm(_delta64(shares_dense[i])))
            for i in range(1)  # all clients have rank 200, so all shares are equal
        )
        err_f = float(
            torch.linalg.matrix_norm(_delta64(shares_fact[0][name]) - _delta64(shares_dense[0])) / torch.linalg.matrix_norm(_delta64(shares_dense[0]))
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        # paired ratios of adjacent runs cancel slow drifts of the machine's load
        paired = [a / d for a, d in zip(times["auto"], times["dense_reference"])]
        ratio = statistics.median(paired)
        out.append({
            "shape": f"{d_out}x{d_in}",
            "d_out": d_out,
            "d_in": d_in,
            "n_clients": n_clients,
            "client_ranks": ranks,
            "R": R,
            "width": min(d_out, d_in),
            "path_chosen": state_auto.info["svd_paths"][name],
            "estimated_flops": lowrank.estimated_flops(d_out, d_in, R),
            "time_auto_s": med["auto"],
            "time_dense_s": med["dense_reference"],
            "time_factored_forced_s": med["factored_forced"],
            "times_s": times,
            "auto_over_dense": ratio,
            "auto_over_dense_how": "median over repeats of time(auto)/time(dense) of the same interleaved repeat",
            "auto_over_dense_of_medians": med["auto"] / med["dense_reference"],
            "auto_over_dense_of_mins": min(times["auto"]) / min(times["dense_reference"]),
            "speedup_vs_dense": 1.0 / ratio,
            "factored_forced_over_dense": med["factored_forced"] / med["dense_reference"],
            "max_rel_error": err,
            "max_rel_error_factored_forced": err_f,
            "profile_auto_s": profile_ours(updates, specs, name)[0],
            "not_slower_strict": ratio <= 1.0,
            "not_slower_within_tolerance": ratio <= 1.0 + NOT_SLOWER_TOLERANCE,
        })
    return out


def bench_r_sweep(cfg: dict[str, Any], shapes: dict[str, dict[str, Any]], log) -> list[dict[str, Any]]:
    """How our time grows with the stacked rank R (n clients of rank 200) at the 7B shapes.

    Only ours is run; the speedup uses the dense time measured above for the same shape, whose
    cost is dominated by the SVD of the d_out x d_in matrix and hardly depends on R (the dense
    product grows with R, so the estimate is slightly optimistic for R above the measured case
    and pessimistic below it)."""
    out = []
    for key in cfg["sweep_shapes"]:
        ref = shapes.get(key)
        if ref is None:
            continue
        d_out, d_in = ref["d_out"], ref["d_in"]
        name = "model.layers.0.sweep"
        for n in cfg["sweep_clients"]:
            ranks = [200] * n
            sizes = draw_clients(n, cfg["seed"] + 2)[1]
            updates, specs = make_updates(name, d_out, d_in, ranks, sizes, cfg["seed"] + 2)
            log(f"  R sweep: {key}, {n} x rank 200 (R={sum(ranks)}) ...")
            run_ours(updates, specs)
            times = []
            for _ in range(3):
                dt, (state, _) = timed(lambda u=updates, s=specs: run_ours(u, s))
                times.append(dt)
            med = statistics.median(times)
            out.append({
                "shape": key,
                "R": sum(ranks),
                "n_clients": n,
                "path_chosen": state.info["svd_paths"][name],
                "time_ours_s": med,
                "times_ours_s": times,
                "dense_time_ref_s": ref["time_dense_s"],
                "speedup_vs_dense_est": ref["time_dense_s"] / med,
            })
            del updates, specs, state
    return out


def per_model_extrapolation(shapes: list[dict[str, Any]]) -> dict[str, Any]:
    res = {}
    for model in dict.fromkeys(s["model"] for s in shapes):
        rows = [s for s in shapes if s["model"] == model]
        t_o = sum(s["modules_per_model"] * s["time_ours_s"] for s in rows)
        t_d = sum(s["modules_per_model"] * s["time_dense_s"] for s in rows)
        res[model] = {
            "extrapolated": True,
            "how": "sum over the model's LoRA modules of the median time measured on ONE module of the same shape (not measured end to end)",
            "n_modules": sum(s["modules_per_model"] for s in rows),
            "module_counts": {s["shape"]: s["modules_per_model"] for s in rows},
            "time_ours_s": t_o,
            "time_dense_s": t_d,
            "speedup_vs_dense": t_d / t_o,
            "config": MODELS[model],
        }
    return res


def evaluate_targets(shapes, wide, models_run) -> dict[str, Any]:
    t: dict[str, Any] = {}
    s7 = [s for s in shapes if s["model"] == "llama-2-7b"]
    if s7:
        worst = min(s7, key=lambda s: s["speedup_vs_dense"])
        t["speedup_7b"] = {
            "target": f">= {TARGET_SPEEDUP:g}x speedup at LLaMA-2-7B shapes (every distinct shape)",
            "value": worst["speedup_vs_dense"],
            "worst_shape": worst["shape"],
            "per_shape": {s["shape"]: s["speedup_vs_dense"] for s in s7},
            "status": "pass" if worst["speedup_vs_dense"] >= TARGET_SPEEDUP else "fail",
            "serving_value": min(s["speedup_vs_dense_serving"] for s in s7),
            "serving_note": "FlexLoRA(keep_rank=largest client rank): every singular value, singular vectors only for the ranks handed out",
        }
    else:
        largest = [s for s in shapes if s["model"] == models_run[0]]
        t["speedup_7b"] = {
            "target": f">= {TARGET_SPEEDUP:g}x speedup at LLaMA-2-7B shapes",
            "value": None,
            "status": "not evaluated",
            "note": f"--quick runs {models_run} shapes only; their min speedup was "
            + (f"{min(s['speedup_vs_dense'] for s in largest):.1f}x" if largest else "n/a"),
        }
    errs = {f"{s['model']}/{s['shape']}": s["max_rel_error"] for s in shapes}
    errs.update({f"wide/{w['shape']}/R={w['R']}": w["max_rel_error"] for w in wide})
    worst_err = max(errs.values()) if errs else float("nan")
    t["rel_error"] = {
        "target": f"max_rel_error <= {TARGET_REL_ERROR:g} (ours vs dense share deltas, all clients, all timed shapes)",
        "value": worst_err,
        "per_case": errs,
        "status": "pass" if worst_err <= TARGET_REL_ERROR else "fail",
    }
    if wide:
        worst_w = max(wide, key=lambda w: w["auto_over_dense"])
        t["not_slower_when_R_ge_width"] = {
            "target": "auto is never slower than dense when R >= width",
            "value": worst_w["auto_over_dense"],
            "tolerance": NOT_SLOWER_TOLERANCE,
            "all_auto_chose_dense": all(w["path_chosen"] == "dense" for w in wide),
            "strict_pass": all(w["not_slower_strict"] for w in wide),
            "status": "pass" if all(w["not_slower_within_tolerance"] for w in wide) else "fail",
            "note": f"pass = median paired time ratio auto/dense <= 1+{NOT_SLOWER_TOLERANCE} for every case; strict_pass without tolerance",
        }
    return t


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console(width=200)
    env = res["environment"]
    con.print(
        f"[bold]FlexLoRA aggregation benchmark[/bold] ({res['mode']}) torch {env['versions']['torch']}, "
        f"python {env['versions']['python']}, nproc {env['machine']['nproc']}, torch threads {env['machine']['torch_num_threads']}, float32"
    )
    m = env["machine"]
    con.print(f"load average (1/5/15 min) at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end')} on {m['nproc']} CPUs")
    con.print(f"clients: {res['clients']['n']}, types {res['clients']['types']} (seed {res['clients']['seed']}), n_k {res['clients']['num_examples']}")

    tab = Table(title="Per module shape (one module of each shape; times are medians; \"(of mins)\" = speedup of the fastest runs; flop ratio = estimated dense/factored flops)")
    for col in ("model", "shape d_out x d_in", "modules", "R", "path", "ours s", "dense s", "speedup", "(of mins)", "serving speedup", "flop ratio", "max rel err", "S err/s1", "mem ours MiB", "mem dense MiB"):
        tab.add_column(col, justify="right" if col not in ("model", "modules", "path") else "left")
    for s in res["shapes"].values():
        sv = s["singular_values"]["ours_vs_dense_max_abs_err_over_s1"]
        tab.add_row(
            s["model"], s["shape"], f"{'/'.join(m.replace('_proj', '') for m in s['modules'])} x{s['modules_per_model']}", str(s["R"]), s["path_chosen"],
            f"{s['time_ours_s']:.3f}", f"{s['time_dense_s']:.2f}", f"{s['speedup_vs_dense']:.1f}x", f"{s['speedup_vs_dense_of_mins']:.1f}x", f"{s['speedup_vs_dense_serving']:.1f}x",
            f"{s['flops_dense_over_factored']:.1f}", f"{s['max_rel_error']:.2e}", f"{sv:.1e}",
            _fmt(s["peak_mem_mib_ours"]), _fmt(s["peak_mem_mib_dense"]),
        )
    con.print(tab)
    for key, s in res["shapes"].items():
        if s.get("time_dense_svd_of_transpose_s"):
            con.print(
                f"  note {key}: d_out < d_in; dense with torch.linalg.svd(dW.T) instead (not what the official code does): "
                f"{s['time_dense_svd_of_transpose_s']:.2f} s, speedup of ours against that {s['speedup_vs_dense_svd_of_transpose']:.1f}x"
            )

    tab = Table(title="Per model, EXTRAPOLATED (sum over modules of the per-shape time; not measured end to end)")
    for col in ("model", "modules", "ours s", "dense s", "speedup"):
        tab.add_column(col, justify="right" if col != "model" else "left")
    for m, v in res["per_model_extrapolated"].items():
        tab.add_row(m, str(v["n_modules"]), f"{v['time_ours_s']:.1f}", f"{v['time_dense_s']:.1f}", f"{v['speedup_vs_dense']:.1f}x")
    con.print(tab)

    tab = Table(title="Where the time goes (ours: one separate step-by-step run; dense: last timed run; seconds)")
    tab.add_column("model/shape")
    tab.add_column("steps")
    for key, s in res["shapes"].items():
        steps = ", ".join(f"{k} {v:.3f}" for k, v in s["profile_ours_s"].items())
        steps += "".join(f"; [{k}: {v:.3f}]" for k, v in s.get("profile_ours_extra_s", {}).items())
        tab.add_row(key + " ours", escape(steps))
        if s.get("profile_dense_s"):
            tab.add_row(key + " dense", ", ".join(f"{k} {v:.3f}" for k, v in s["profile_dense_s"].items()))
    con.print(tab)

    if res.get("r_sweep"):
        tab = Table(title="Ours vs stacked rank R (n clients of rank 200); speedup uses the dense time measured above for the shape")
        for col in ("shape", "R", "path", "ours s", "est. speedup"):
            tab.add_column(col, justify="right")
        for r in res["r_sweep"]:
            tab.add_row(r["shape"], str(r["R"]), r["path_chosen"], f"{r['time_ours_s']:.3f}", f"{r['speedup_vs_dense_est']:.1f}x")
        con.print(tab)

    if res["wide_rank"]:
        tab = Table(title="R >= width (auto vs dense reference; times: medians of interleaved repeats; auto/dense: median of paired ratios)")
        for col in ("shape", "clients", "R", "auto path", "auto s", "dense s", "auto/dense", "factored forced s", "max rel err"):
            tab.add_column(col, justify="right")
        for w in res["wide_rank"]:
            tab.add_row(
                w["shape"], f"{w['n_clients']} x r200", str(w["R"]), w["path_chosen"], f"{w['time_auto_s']:.3f}", f"{w['time_dense_s']:.3f}",
                f"{w['auto_over_dense']:.3f}", f"{w['time_factored_forced_s']:.3f}", f"{w['max_rel_error']:.2e}",
            )
        con.print(tab)

    tab = Table(title="Targets")
    for col in ("target", "value", "status"):
        tab.add_column(col)
    for t in res["targets"].values():
        v = t["value"]
        vs = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        style = {"pass": "green", "fail": "red"}.get(t["status"], "yellow")
        extra = f" ({t['note']})" if "note" in t and t["status"] == "not evaluated" else ""
        tab.add_row(t["target"], vs, f"[{style}]{t['status'].upper()}[/{style}]{extra}")
    con.print(tab)
    con.print(f"wrote {res['output']}  (total wall time {res['wall_time_s']:.0f} s)")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1.3B shapes only, fewer repeats (< 1 minute)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/aggregation[_quick].json)")
    ap.add_argument("--skip-memory", action="store_true", help="do not spawn the peak-memory children")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for both paths (default: torch's default)")
    ap.add_argument("--show", type=Path, default=None, metavar="JSON", help="print the tables of an existing results file and exit")
    args = ap.parse_args(argv)
    if args.show is not None:
        import json

        print_report(json.loads(args.show.read_text()))
        return 0

    cfg = {
        "seed": args.seed,
        "skip_memory": args.skip_memory,
        "models": ["llama-1.3b"] if args.quick else ["llama-2-7b", "llama-1.3b"],
        "repeats_ours": 2 if args.quick else 5,
        "warmup": not args.quick,
        "prototype": not args.quick,
        "dense_transposed": not args.quick,
        "float64_reference": not args.quick,
        "repeats_dense": 1 if args.quick else 2,
        "wide_clients": [3, 10] if args.quick else [3, 10, 20],
        "wide_repeats": 5 if args.quick else 9,
        "sweep_shapes": [] if args.quick else ["llama-2-7b/4096x4096", "llama-2-7b/11008x4096"],
        "sweep_clients": [1, 2, 4, 8],
    }
    out = args.out or RESULTS_DIR / ("aggregation_quick.json" if args.quick else "aggregation.json")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    types, sizes = draw_clients(args.clients, args.seed)
    log(f"clients: types {types}, n_k {sizes}, torch threads {torch.get_num_threads()}, loadavg {os.getloadavg()}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        log(f"WARNING: 1-min load average {os.getloadavg()[0]:.1f} exceeds the {os.cpu_count()} CPUs: other work is running, timings will be noisy")

    # Peak memory first, while this (parent) process is still small: a spawned child inherits the
    # parent's RSS at spawn time as its initial ru_maxrss (see _mem_child).
    memory: dict[str, dict[str, Any]] = {}
    if not args.skip_memory:
        for model in cfg["models"]:
            for grp in shape_groups(model):
                name, ranks = shape_case(grp, types)
                log(f"  {model} {grp['key']}: peak memory of each path in a fresh spawn child ...")
                memory[f"{model}/{grp['key']}"] = measure_peaks(name, grp["d_out"], grp["d_in"], ranks, sizes, args.seed)
    _lapack_warmup()

    shapes: dict[str, dict[str, Any]] = {}
    for model in cfg["models"]:
        for grp in shape_groups(model):
            key = f"{model}/{grp['key']}"
            s = bench_shape(model, grp, types, sizes, cfg, memory.get(key, {}), log)
            shapes[key] = s
            log(
                f"    -> R={s['R']} {s['path_chosen']}: ours {s['time_ours_s']:.3f}s dense {s['time_dense_s']:.2f}s "
                f"speedup {s['speedup_vs_dense']:.1f}x err {s['max_rel_error']:.1e} mem {_fmt(s['peak_mem_mib_ours'])}/{_fmt(s['peak_mem_mib_dense'])} MiB"
            )
    wide = bench_wide_rank(cfg, log)
    sweep = bench_r_sweep(cfg, shapes, log)

    res = {
        "mode": "quick" if args.quick else "full",
        "environment": env,
        "config": {
            **cfg,
            "dtype": str(DTYPE),
            "alpha": ALPHA,
            "scale": "alpha / r",
            "init": "A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)); B ~ N(0, 0.02^2)",
            "weights": "p_k = n_k / sum n_j, n_k ~ U{16..520}",
            "resource_types": {str(k): {"attn_rank": a, "mlp_rank": m} for k, (a, m) in RESOURCE_TYPES.items()},
            "ours": "FlexLoRA(svd_path='auto').aggregate(updates) + share_for(each client)",
            "dense": "dW = sum p_k s_k B_k A_k (addmm_ into float32), torch.linalg.svd(dW, full_matrices=False), per-client truncation",
            "memory": "ru_maxrss after the path minus ru_maxrss after imports + inputs + LAPACK warm-up, each path in a fresh spawn child",
            "models": {m: MODELS[m] for m in cfg["models"]},
        },
        "clients": {
            "n": args.clients,
            "seed": args.seed,
            "distribution": "uniform over the 4 resource types",
            "types": types,
            "type_counts": {str(t): types.count(t) for t in sorted(RESOURCE_TYPES)},
            "attn_ranks": [RESOURCE_TYPES[t][0] for t in types],
            "mlp_ranks": [RESOURCE_TYPES[t][1] for t in types],
            "num_examples": sizes,
        },
        "shapes": shapes,
        "per_model_extrapolated": per_model_extrapolation(list(shapes.values())),
        "wide_rank": wide,
        "r_sweep": sweep,
    }
    res["targets"] = evaluate_targets(list(shapes.values()), wide, cfg["models"])
    res["environment"]["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_time_s"] = time.perf_counter() - start
    res["output"] = str(out)
    write_json(out, res)
    print_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
