"""What one round of aggregation did to each module, returned as data.

For every module: the spectrum of the global update (its effective rank, how many singular
values hold 90% / 99% of the energy), and for every rank that is handed out the energy that
rank captures and its relative truncation error. Methods that are not exact (FedAvg of
factors, HetLoRA's zero padding) are also measured against the exact weighted sum of the
clients' updates, ``sum_k p_k s_k B_k A_k``, so their aggregation noise is visible. A spectrum
whose energy sits in the first few singular values is the "rank collapse" raFLoRA warns of.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from flexlora.lowrank import LowRankSum, factored_distance, factored_fro_norm, map_modules, stack_factors, svd_of_product
from flexlora.update import ClientUpdate, GlobalModule, ServerState


def spectrum_summary(S: Tensor, ranks: Iterable[int]) -> dict:
    """Energy and relative truncation error per rank, effective rank, rank for 90%/99% energy."""
    s = S.to(torch.float64).clamp_min(0)
    energy = s.square()
    total = float(energy.sum())
    out: dict = {"num_singular_values": int(s.numel()), "top_singular_values": [float(x) for x in s[:8]]}
    if total <= 0:
        out.update(effective_rank=0.0, rank_90=0, rank_99=0, energy={}, truncation_error={})
        return out
    cum = torch.cumsum(energy, 0) / total
    p = s / s.sum()
    p = p[p > 0]
    out["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))  # Roy & Vetterli (2007)
    out["rank_90"] = int((cum < 0.9).sum()) + 1
    out["rank_99"] = int((cum < 0.99).sum()) + 1
    out["energy"] = {}
    out["truncation_error"] = {}
    for r in sorted(set(ranks)):
        captured = float(cum[min(r, s.numel()) - 1]) if r > 0 else 0.0
        out["energy"][str(r)] = captured
        out["truncation_error"][str(r)] = math.sqrt(max(0.0, 1.0 - captured))
    return out


def _global_factors(state: ServerState, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The global update of one module as (B, A): the adapter plus, for FLoRA, the merged stack."""
    parts = [state.adapter[name]]
    if state.base_delta is not None and name in state.base_delta:
        parts.append(state.base_delta[name])
    B = torch.cat([gm.B.to(dtype) for gm in parts], dim=1)
    A = torch.cat([gm.A.to(dtype) for gm in parts], dim=0)
    return B, A


def aggregation_report(
    state: ServerState,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    share_ranks: dict[str, Iterable[int]] | None = None,
    dtype: torch.dtype = torch.float64,
    exact: bool = False,
    probes: int = 16,
    reference: "ExactReference | None" = None,
) -> dict[str, dict]:
    """Per module: spectrum of the global update, energy / truncation error per shared rank,
    and the relative distance of the global update to the exact weighted sum of the clients'.

    What an SVD already knows is read off its spectrum (norm, truncation and share errors).
    ``exact=True`` is for methods whose aggregate is exact by construction (property-tested):
    their distance to the exact sum is then estimated from ``probes`` fixed Gaussian probe vectors,
    ``||(G - E) X||_F / ||E X||_F``, at O((d_out + d_in) R probes) instead of a QR of the stack
    (``rel_error_method`` says which was used). Inexact methods always get the exact distance.
    """
    def one(name: str) -> dict:
        gm: GlobalModule = state.adapter[name]
        coeffs = [w * u.modules[name].scale for u, w in zip(updates, weights)]
        svd_ordered = gm.spectrum is not None and state.base_delta is None
        # an exact SVD-ordered state is probed in its own precision (no float64 copy of full-rank factors)
        B, A = (gm.B, gm.A) if svd_ordered and exact else _global_factors(state, name, dtype)
        if svd_ordered:
            S = gm.spectrum
        elif A.shape[0] > 0:
            S = svd_of_product(B, A).S
        else:
            S = torch.zeros(0, dtype=dtype)
        if share_ranks:
            ranks = list(share_ranks.get(name, []))
        else:
            ranks = sorted(reference.ranks[name]) if reference is not None else sorted({u.modules[name].rank for u in updates})
        entry = spectrum_summary(S, ranks)
        kept = S.to(torch.float64)[: gm.rank] if svd_ordered else None  # the triplets the state holds
        entry["global_norm"] = float(kept.norm()) if kept is not None else factored_fro_norm(B, A)
        if exact:
            if reference is not None:
                entry["rel_error_vs_exact"] = _probe_distance(B, A, *reference.probed(name))
            else:
                entry["rel_error_vs_exact"] = _probe_rel_error(B, A, [(c, u.modules[name]) for c, u in zip(coeffs, updates)], probes, dtype)
            entry["rel_error_method"] = f"probe-{probes if reference is None else reference.probes}"
        else:
            if reference is not None and reference.sums[name].dense is not None:  # the exact sum went dense while folding
                E = reference.sums.pop(name).mean().to(dtype)
                exact_norm = float(torch.linalg.matrix_norm(E))
                dist = float(torch.linalg.matrix_norm(B.to(dtype) @ A.to(dtype) - E))
            else:
                if reference is not None:
                    exact_B, exact_A = reference.sums.pop(name).stack(dtype)
                else:
                    exact_B, exact_A = stack_factors([u.modules[name].B for u in updates], [u.modules[name].A for u in updates], coeffs, dtype)
                exact_norm = factored_fro_norm(exact_B, exact_A)
                dist = factored_distance(B, A, exact_B, exact_A)
            entry["exact_norm"] = exact_norm
            entry["rel_error_vs_exact"] = dist / exact_norm if exact_norm > 0 else 0.0
            entry["rel_error_method"] = "exact"
        if state.base_delta is None and entry["global_norm"] > 0:
            # What a client of rank r actually receives, against the global update (for SVD-ordered
            # states this equals the spectral truncation error; for padded states it is larger).
            if kept is not None:
                tail = kept.square().flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} S_j^2
                entry["share_error"] = {
                    str(r): (float(tail[r].sqrt()) if r < kept.numel() else 0.0) / entry["global_norm"] for r in sorted(set(ranks))
                }
            else:
                Bg, Ag = gm.B.to(dtype), gm.A.to(dtype)
                entry["share_error"] = {
                    str(r): factored_distance(Bg[:, :r], Ag[:r], Bg, Ag) / entry["global_norm"] for r in sorted(set(ranks))
                }
        return entry

    names = list(state.adapter)
    return dict(zip(names, map_modules(one, names)))  # modules are independent


def _probe_matrix(d_in: int, probes: int) -> Tensor:
    """The fixed Gaussian probes (float64, seed 0) every probe estimate uses."""
    return torch.randn(d_in, probes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _probed(B: Tensor, A: Tensor, X: Tensor, work: torch.dtype) -> Tensor:
    return (B.to(work) @ (A.to(work) @ X.to(work))).to(torch.float64)


def _probe_distance(B: Tensor, A: Tensor, EX: Tensor, work: torch.dtype) -> float:
    """``||B A X - EX||_F / ||EX||_F`` (``EX``: the exact sum times the probes, float64)."""
    denom = float(torch.linalg.matrix_norm(EX))
    if denom == 0:
        return 0.0
    for t in (B, A):
        work = torch.promote_types(work, t.dtype)
    GX = _probed(B, A, _probe_matrix(A.shape[1], EX.shape[1]), work) if A.shape[0] else torch.zeros_like(EX)
    return float(torch.linalg.matrix_norm(GX - EX)) / denom


class ExactReference:
    """What :func:`aggregation_report` compares a state with, folded as the updates arrive, so the
    server need not keep them: per module, for an exact method, the exact weighted sum times the fixed
    probes (``d_out x probes`` numbers in float64); for an inexact one, the exact weighted sum itself
    (a :class:`~flexlora.lowrank.LowRankSum`: the clients' factors while that is smaller, else the
    dense sum in ``dtype``). Weights are unnormalised (data sizes): divided by their sum at the end.

    Against the report from the updates: a factored exact sum gives the same bits (the same float64
    stack); a dense one is summed in ``dtype`` (float32: its distances agree to ~1e-6 relative);
    probes are summed in float64 with the weights applied before normalising (~1e-15 relative), each
    client's product in the precision it carries, where the report from updates uses the highest any
    client carries (different only when the clients' dtypes differ)."""

    def __init__(self, exact: bool, probes: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.exact = exact
        self.probes = probes
        self.dtype = dtype
        self.device = device
        self.work = torch.promote_types(torch.float32, dtype)  # the highest precision a factor carried
        self.weight = 0.0
        self.probe_sums: dict[str, Tensor] = {}
        self.sums: dict[str, LowRankSum] = {}
        self.ranks: dict[str, set[int]] = {}
        self._X: dict[int, Tensor] = {}

    def add(self, update: ClientUpdate, weight: float) -> None:
        self.weight += weight
        for name, f in update.modules.items():
            self.ranks.setdefault(name, set()).add(f.rank)
            if self.exact:
                self.work = torch.promote_types(torch.promote_types(self.work, f.B.dtype), f.A.dtype)
                if f.d_in not in self._X:
                    self._X[f.d_in] = _probe_matrix(f.d_in, self.probes)
            elif name not in self.sums:
                self.sums[name] = LowRankSum(f.d_out, f.d_in, self.dtype, self.device)

        def add(name: str) -> None:
            f = update.modules[name]
            if not self.exact:
                self.sums[name].add(f.B, f.A, weight, f.scale)
                return
            work = torch.promote_types(torch.promote_types(torch.promote_types(torch.float32, self.dtype), f.B.dtype), f.A.dtype)
            term = _probed(f.B, f.A, self._X[f.d_in], work).mul_(weight * f.scale)
            if name in self.probe_sums:
                self.probe_sums[name] += term
            else:
                self.probe_sums[name] = term

        map_modules(add, list(update.modules))  # one thread per module: the bits do not depend on the thread count

    def probed(self, name: str) -> tuple[Tensor, torch.dtype]:
        """The exact sum times the probes, and the precision the products were taken in."""
        return self.probe_sums[name] / self.weight, self.work


def _probe_rel_error(B: Tensor, A: Tensor, clients: Sequence[tuple[float, Any]], probes: int, dtype: torch.dtype) -> float:
    """``||(B A - sum_k c_k B_k A_k) X||_F / ||sum_k c_k B_k A_k X||_F`` for a fixed Gaussian X
    (d_in x probes): its square is an unbiased estimate of the squared relative Frobenius error, and
    any nonzero error shows with probability 1. Never forms a stack or a dense matrix. The products are
    taken in the highest precision any factor carries (all float32: a floor of ~1e-6, the precision
    they carry, without float64 copies of full-rank factors; any float64: ~1e-15), summed in float64."""
    d_in = A.shape[1]
    X64 = torch.randn(d_in, probes, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    work = torch.float32  # the highest precision any factor (global or client) carries, at least float32
    for t in (B, A, *(t for _, f in clients for t in (f.B, f.A))):
        work = torch.promote_types(work, t.dtype)
    X = X64.to(work)

    def probed(B: Tensor, A: Tensor) -> Tensor:
        return (B.to(work) @ (A.to(work) @ X)).to(torch.float64)

    EX = sum(c * probed(f.B, f.A) for c, f in clients)
    denom = float(torch.linalg.matrix_norm(EX))
    if denom == 0:
        return 0.0
    GX = probed(B, A) if A.shape[0] else torch.zeros_like(EX)
    return float(torch.linalg.matrix_norm(GX - EX)) / denom


def summarise(report: dict[str, dict]) -> dict:
    """Averages over modules of a per-module report: the numbers a round's log line needs."""
    if not report:
        return {}
    entries = list(report.values())
    mean = lambda key: sum(e.get(key, 0.0) for e in entries) / len(entries)  # noqa: E731
    ranks = sorted({r for e in entries for r in e.get("energy", {})}, key=int)
    return {
        "effective_rank": mean("effective_rank"),
        "rel_error_vs_exact": mean("rel_error_vs_exact"),
        "max_rel_error_vs_exact": max(e.get("rel_error_vs_exact", 0.0) for e in entries),
        "energy": {r: sum(e["energy"].get(r, 0.0) for e in entries if r in e["energy"]) / max(1, sum(r in e["energy"] for e in entries)) for r in ranks},
        "truncation_error": {
            r: sum(e["truncation_error"].get(r, 0.0) for e in entries if r in e["truncation_error"]) / max(1, sum(r in e["truncation_error"] for e in entries))
            for r in ranks
        },
    }
