"""Exact SVD of a weighted sum of low-rank products, without the dense matrix when that is cheaper.

FlexLoRA's server computes ``dW = sum_k c_k B_k @ A_k`` and its SVD for every LoRA module.
Stacking the factors, ``dW = Bcat @ Acat`` with ``Bcat = [c_1 B_1, ..., c_K B_K]`` (d_out x R) and
``Acat = [A_1; ...; A_K]`` (R x d_in), so ``rank(dW) <= R = sum_k r_k``. When R is below the
layer width, two thin QR factorisations and one small SVD give the exact SVD:

    Bcat = Qb Rb,  Acat^T = Qa Ra,  Rb Ra^T = Um S Vm^T   =>   dW = (Qb Um) S (Qa Vm)^T

at O((d_out + d_in) R^2) time and O((d_out + d_in) R) memory instead of O(d_out d_in min(d))
and O(d_out d_in). When R is large the dense path is cheaper; ``auto`` picks by a flop count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

SvdPath = Literal["auto", "factored", "dense"]


@dataclass(frozen=True)
class Svd:
    """``U @ diag(S) @ Vh``: U (d_out x k), S (k,), Vh (k x d_in), S sorted in descending order."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    path: str  # which path computed it: "factored" or "dense"

    def reconstruct(self, rank: int | None = None) -> Tensor:
        k = self.S.shape[0] if rank is None else min(rank, self.S.shape[0])
        return (self.U[:, :k] * self.S[:k]) @ self.Vh[:k]


def stack_factors(Bs: Sequence[Tensor], As: Sequence[Tensor], coeffs: Sequence[float], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``sum_k coeffs[k] * Bs[k] @ As[k] == Bcat @ Acat`` exactly (the coefficient goes on B)."""
    if not (len(Bs) == len(As) == len(coeffs)) or not Bs:
        raise ValueError(f"need the same positive number of B, A and coefficients, got {len(Bs)}, {len(As)}, {len(coeffs)}")
    d_out = Bs[0].shape[0]
    Bcat = torch.empty(d_out, sum(B.shape[1] for B in Bs), dtype=dtype, device=Bs[0].device)
    col = 0
    for B, c in zip(Bs, coeffs):  # one pass: write c * B straight into its block
        torch.mul(B.to(Bcat.device, dtype), c, out=Bcat[:, col : col + B.shape[1]])
        col += B.shape[1]
    Acat = torch.cat([A.to(Bcat.device, dtype) for A in As], dim=0)
    return Bcat, Acat


def estimated_flops(d_out: int, d_in: int, total_rank: int) -> dict[str, float]:
    """Rough flop counts of the two paths (LAPACK-style constants), used to choose between them."""
    R = total_rank
    m, n = max(d_out, d_in), min(d_out, d_in)
    k_out, k_in = min(d_out, R), min(d_in, R)
    factored = 2.0 * d_out * R * k_out + 2.0 * d_in * R * k_in  # two thin QRs
    factored += 2.0 * k_out * R * k_in  # Rb @ Ra^T
    factored += 12.0 * max(k_out, k_in) * min(k_out, k_in) ** 2  # small SVD
    factored += 2.0 * (d_out * k_out + d_in * k_in) * min(k_out, k_in)  # rotate back
    dense = 2.0 * d_out * d_in * R + 4.0 * m * n * n + 8.0 * n**3  # product + SVD (gesdd, thin)
    return {"factored": factored, "dense": dense}


def choose_path(d_out: int, d_in: int, total_rank: int) -> str:
    flops = estimated_flops(d_out, d_in, total_rank)
    return "factored" if flops["factored"] <= flops["dense"] else "dense"


def svd_of_product(Bcat: Tensor, Acat: Tensor, path: SvdPath = "auto", keep: int | None = None, dense: Tensor | None = None) -> Svd:
    """Exact thin SVD of ``Bcat @ Acat`` (plus ``dense``, a full-size term such as DP noise, which
    makes the sum full-rank and so always takes the dense path).

    All k = min(R, d_out, d_in) singular values are returned; the singular vectors only for the
    top ``keep`` of them (all when None). Rotating the small SVD's vectors back to full size is a
    large part of the cost, so a server that only hands out ranks up to ``keep`` should say so.
    """
    d_out, R = Bcat.shape
    R2, d_in = Acat.shape
    if R != R2:
        raise ValueError(f"inner dimensions differ: B is {tuple(Bcat.shape)}, A is {tuple(Acat.shape)}")
    if dense is not None:
        if tuple(dense.shape) != (d_out, d_in):
            raise ValueError(f"the dense term is {tuple(dense.shape)}, the product is {(d_out, d_in)}")
        path = "dense"
    elif path == "auto":
        path = choose_path(d_out, d_in, R)
    k = min(R, d_out, d_in) if dense is None else min(d_out, d_in)
    kv = k if keep is None else max(0, min(keep, k))
    if path == "dense":
        dW = Bcat @ Acat
        if dense is not None:
            dW += dense.to(dW.device, dW.dtype)
        if d_out < d_in:  # LAPACK is markedly faster on tall matrices: take the SVD of the transpose
            V, S, Uh = torch.linalg.svd(dW.T, full_matrices=False)
            return Svd(Uh[:kv].T, S[:k], V[:, :kv].T, "dense")
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        return Svd(U[:, :kv], S[:k], Vh[:kv], "dense")
    if path != "factored":
        raise ValueError(f"unknown SVD path {path!r}; use 'auto', 'factored' or 'dense'")
    # Householder QR without forming Q: the reflectors are applied only to the kept vectors.
    hb, tb = torch.geqrf(Bcat)  # Bcat = Qb Rb
    ha, ta = torch.geqrf(Acat.T)  # Acat^T = Qa Ra
    kb, ka = min(d_out, R), min(d_in, R)
    Rb = hb[:kb].triu()
    Ra = ha[:ka].triu()
    Um, S, Vmh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    Ub = Bcat.new_zeros(d_out, kv)
    Ub[:kb] = Um[:, :kv]
    Va = Acat.new_zeros(d_in, kv)
    Va[:ka] = Vmh[:kv].T
    U = torch.ormqr(hb, tb, Ub)  # Qb @ [Um; 0]
    V = torch.ormqr(ha, ta, Va)  # Qa @ [Vm; 0]
    return Svd(U, S[:k], V.T.contiguous(), "factored")


def svd_of_sum(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    coeffs: Sequence[float],
    path: SvdPath = "auto",
    dtype: torch.dtype = torch.float32,
    keep: int | None = None,
    dense: Tensor | None = None,
) -> Svd:
    """Exact thin SVD of ``sum_k coeffs[k] * Bs[k] @ As[k] (+ dense)`` (vectors for the top ``keep`` only)."""
    Bcat, Acat = stack_factors(Bs, As, coeffs, dtype)
    return svd_of_product(Bcat, Acat, path, keep, dense)


def factored_fro_norm(B: Tensor, A: Tensor) -> float:
    """``||B @ A||_F`` from the factors in O((d_out + d_in) k^2): ``||Rb @ Ra^T||_F`` with
    ``B = Qb Rb`` and ``A^T = Qa Ra`` (orthonormal Q's do not change the norm).

    Not ``sqrt(tr((B^T B)(A A^T)))``: squaring loses half the digits, so a distance between two
    factorisations of (nearly) the same matrix could not resolve below ~1e-8 relative in float64.
    """
    d_out, k = B.shape
    d_in = A.shape[1]
    if k == 0:
        return 0.0
    if k * (d_out + d_in) >= d_out * d_in:
        return float(torch.linalg.matrix_norm(B @ A))
    Rb = torch.linalg.qr(B, mode="r").R
    Ra = torch.linalg.qr(A.T, mode="r").R
    return float(torch.linalg.matrix_norm(Rb @ Ra.T))


def factored_distance(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """``||B1 A1 - B2 A2||_F`` without forming either product when that is cheaper."""
    dtype = torch.promote_types(B1.dtype, B2.dtype)
    B = torch.cat([B1.to(dtype), -B2.to(dtype)], dim=1)
    A = torch.cat([A1.to(dtype), A2.to(dtype)], dim=0)
    return factored_fro_norm(B, A)
