"""Exact SVD of a weighted sum of low-rank products, without the dense matrix when that is cheaper.

FlexLoRA's server computes ``dW = sum_k c_k B_k @ A_k`` and its SVD for every LoRA module.
Stacking the factors, ``dW = Bcat @ Acat`` with ``Bcat = [c_1 B_1, ..., c_K B_K]`` (d_out x R) and
``Acat = [A_1; ...; A_K]`` (R x d_in), so ``rank(dW) <= R = sum_k r_k``. When R is below the
layer width, two thin QR factorisations and one small SVD give the exact SVD:

    Bcat = Qb Rb,  Acat^T = Qa Ra,  Rb Ra^T = Um S Vm^T   =>   dW = (Qb Um) S (Qa Vm)^T

at O((d_out + d_in) R^2) time and O((d_out + d_in) R) memory instead of O(d_out d_in min(d))
and O(d_out d_in). When R is large the dense path is cheaper; ``auto`` picks by a flop count.

Below float64, either path's SVD (of ``dW`` or of the small core) is taken through the float64
Gram matrix (:func:`gram_svd`): one matrix product and a symmetric eigendecomposition, 1.2-1.4x
faster than LAPACK's float32 SVD on the 2-core CPU at the demo's shapes and, computed in float64,
more accurate than it (the squared condition number costs float64 digits that float32 never had).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence, TypeVar

import torch
from torch import Tensor

SvdPath = Literal["auto", "factored", "dense"]
Item = TypeVar("Item")
Result = TypeVar("Result")


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
        U, S, Vh = thin_svd(dW, kv)
        return Svd(U, S[:k], Vh, "dense")
    if path != "factored":
        raise ValueError(f"unknown SVD path {path!r}; use 'auto', 'factored' or 'dense'")
    # Householder QR without forming Q: the reflectors are applied only to the kept vectors.
    hb, tb = torch.geqrf(Bcat)  # Bcat = Qb Rb
    ha, ta = torch.geqrf(Acat.T)  # Acat^T = Qa Ra
    kb, ka = min(d_out, R), min(d_in, R)
    Rb = hb[:kb].triu()
    Ra = ha[:ka].triu()
    Um, S, Vmh = thin_svd(Rb @ Ra.T, kv)
    Ub = Bcat.new_zeros(d_out, kv)
    Ub[:kb] = Um
    Va = Acat.new_zeros(d_in, kv)
    Va[:ka] = Vmh.T
    U = torch.ormqr(hb, tb, Ub)  # Qb @ [Um; 0]
    V = torch.ormqr(ha, ta, Va)  # Qa @ [Vm; 0]
    return Svd(U, S[:k], V.T.contiguous(), "factored")


def thin_svd(M: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """``M = U diag(S) Vh`` with all min(M.shape) singular values and the top ``keep`` vectors.

    float64 (and any dtype on a GPU) goes to LAPACK/cuSOLVER's SVD; lower precisions on the CPU go
    through :func:`gram_svd` in float64, which is faster there and at least as accurate."""
    if M.dtype == torch.float64 or M.device.type != "cpu" or min(M.shape) == 0:
        if M.shape[0] < M.shape[1]:  # LAPACK is markedly faster on tall matrices: take the SVD of the transpose
            V, S, Uh = torch.linalg.svd(M.T, full_matrices=False)
            return Uh[:keep].T, S, V[:, :keep].T
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :keep], S, Vh[:keep]
    return gram_svd(M, keep)


def gram_svd(M: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``M`` through the eigendecomposition of its float64 Gram matrix (on the short side).

    For a tall M: ``M^T M = V diag(S^2) V^T`` (``eigh`` in float64), then ``P = M V`` has columns
    ``S_i u_i``, so ``u_i = P_i / S_i``. The product is taken in M's dtype with V rounded to it:
    ``U diag(S) Vh = M V V^T`` reproduces M to M's rounding, and every truncation
    ``U_r S_r Vh_r = M V_r V_r^T`` is M projected on its top-r right singular subspace. Accuracy: a
    singular vector's error is about eps64 * S_1^2 / (S_i gap_i) + eps(M) against eps(M) * S_1 / gap_i
    for LAPACK's SVD in M's dtype; for float32 the first term is the smaller one for every S_i above
    ~2e-9 S_1, which is all that float32 data resolves. The vectors computed as ``M V / S`` are
    orthonormal to about eps(M) S_1 / S_i: those of tiny singular values carry no weight (``U S`` is
    what every caller uses) and are not orthonormalised; zero where S_i = 0.
    Returns M's dtype: U (d_out x keep), S (all min(d_out, d_in)), Vh (keep x d_in)."""
    W = M.to(torch.float64)
    tall = W.shape[0] >= W.shape[1]
    lam, E = torch.linalg.eigh(W.T @ W if tall else W @ W.T)  # ascending
    n = lam.numel()
    S = lam.flip(0).clamp_min(0).sqrt()  # descending: eigh sorts
    top = torch.arange(n - 1, n - 1 - keep, -1, device=E.device)
    Et = E.mT.index_select(0, top).to(M.dtype)  # the top ``keep`` eigenvectors as rows, in M's dtype
    S_top = S[:keep].to(M.dtype)
    inverse = torch.where(S_top > 0, 1 / S_top, torch.zeros_like(S_top))
    scaled = Et * inverse[:, None]  # dividing the small side by S instead of the product
    if tall:  # Et holds right vectors: U = M V / S
        return M @ scaled.T, S.to(M.dtype), Et
    return Et.T, S.to(M.dtype), scaled @ M  # Et holds left vectors: Vh = U^T M / S


def map_modules(fn: Callable[[Item], Result], items: Iterable[Item], device: torch.device | str = "cpu") -> list[Result]:
    """``[fn(x) for x in items]``, on the CPU spread over one worker per torch thread.

    A module's SVD or eigendecomposition of the demo's sizes (a few hundred wide) spends most of its
    time in LAPACK's reduction to tridiagonal/bidiagonal form, which two threads barely speed up; two
    modules at a time on one thread each do (FlexLoRA on a real round of ``make demo``, 210 modules,
    four clients at rank 200: 12.7 s -> 9.2 s on 2 cores). With fewer modules than threads each
    worker gets an equal share of the threads (one 4096-wide module keeps them all). With at least
    as many modules as threads every module is computed on one thread, so the result does not
    depend on the thread count. torch's thread count is restored afterwards. On a GPU: a plain loop.

    Every item sets its thread's count itself: a new thread's OpenMP and MKL start at the machine's
    default and take torch's setting only at the thread's first parallel op, so without it a module's
    LAPACK/BLAS calls ran on 1 or on all threads depending on which worker took it and when (the
    machine's load), and the bytes of the result changed with the load.
    """
    items = list(items)
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if torch.device(device).type != "cpu" or workers <= 1:
        return [fn(x) for x in items]
    each = threads // workers

    def pinned(x: Item) -> Result:
        torch.set_num_threads(each)  # this thread's OpenMP and MKL counts, whatever ran on it before
        return fn(x)

    torch.set_num_threads(each)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexlora-module") as pool:
            return list(pool.map(pinned, items))
    finally:
        torch.set_num_threads(threads)


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


class LowRankSum:
    """``sum_k (w_k / W) s_k B_k @ A_k`` of one module, folded one term at a time (``W = sum_k w_k``,
    known only at the end), in about the memory of one dense update however many terms come.

    While the stacked rank ``R = sum_k r_k`` is one at which :func:`choose_path` takes the factored
    path, the terms' factors are kept and :meth:`svd` is exactly :func:`svd_of_sum` of them (the same
    stack, coefficients ``(w_k / W) s_k``: the same bits). From the rank at which the dense path is
    cheaper (monotone in R: it stays cheaper) the dense sum ``sum_k w_k s_k B_k A_k`` is kept instead,
    divided by ``W`` at the end; a stack of that rank is at most ~1.7x the dense matrix at the layer
    shapes of SmolLM2 and LLaMA-1.3B, so the memory never exceeds that. The dense sum adds the
    terms' products one by one instead of one product of the stack, so it equals the stacked path to
    rounding (float32: ~1e-6 relative), not bit for bit. ``path="factored"`` keeps every term (the
    user asked for that path); ``"dense"`` sums densely from the first term.
    """

    def __init__(self, d_out: int, d_in: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", path: SvdPath = "auto") -> None:
        if path not in ("auto", "factored", "dense"):
            raise ValueError(f"unknown SVD path {path!r}; use 'auto', 'factored' or 'dense'")
        self.shape = (d_out, d_in)
        self.dtype = dtype
        self.device = torch.device(device)
        self.path = path
        self.terms: list[tuple[Tensor, Tensor, float, float]] = []  # (B, A, w, s) while factored
        self.dense: Tensor | None = None  # sum_k w_k s_k B_k A_k once dense
        self.rank = 0  # the stacked rank R so far
        self.weight = 0.0  # W so far

    def add(self, B: Tensor, A: Tensor, weight: float, scale: float = 1.0) -> None:
        """Fold ``weight * scale * B @ A`` (the factors are kept by reference while factored)."""
        if (B.shape[0], A.shape[1]) != self.shape or B.shape[1] != A.shape[0]:
            raise ValueError(f"a term B{tuple(B.shape)} A{tuple(A.shape)} does not fit a {self.shape} sum")
        self.rank += int(A.shape[0])
        self.weight += weight
        if self.dense is None and (self.path == "dense" or (self.path == "auto" and choose_path(*self.shape, self.rank) == "dense")):
            self.dense = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            for t in self.terms:
                self._add_dense(*t)
            self.terms = []
        if self.dense is None:
            self.terms.append((B, A, weight, scale))
        else:
            self._add_dense(B, A, weight, scale)

    def _add_dense(self, B: Tensor, A: Tensor, weight: float, scale: float) -> None:
        self.dense.addmm_(B.to(self.device, self.dtype) * (weight * scale), A.to(self.device, self.dtype))

    def stack(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The factored sum as ``Bcat @ Acat`` (coefficients ``(w_k / W) s_k`` on B), as :func:`stack_factors`."""
        if self.dense is not None:
            raise ValueError("the sum is dense: it has no stack")
        W = self.weight
        return stack_factors([t[0].to(self.device) for t in self.terms], [t[1].to(self.device) for t in self.terms], [(w / W) * s for _, _, w, s in self.terms], dtype or self.dtype)

    def mean(self) -> Tensor:
        """The dense sum divided by ``W`` (only once dense)."""
        if self.dense is None:
            raise ValueError("the sum is still factored: use stack()")
        return self.dense / self.weight

    def svd(self, keep: int | None = None, dense: Tensor | None = None) -> Svd:
        """The exact thin SVD of the sum (plus ``dense``), as :func:`svd_of_sum` of the terms would give."""
        if self.dense is None:
            Bcat, Acat = self.stack()
            return svd_of_product(Bcat, Acat, self.path, keep, dense)  # "auto" picks the factored path here, as for the whole stack
        dW = self.mean()
        if dense is not None:
            dW += dense.to(dW.device, dW.dtype)
        d_out, d_in = self.shape
        k = min(d_out, d_in) if dense is not None else min(self.rank, d_out, d_in)
        U, S, Vh = thin_svd(dW, k if keep is None else max(0, min(keep, k)))
        return Svd(U, S[:k], Vh, "dense")
