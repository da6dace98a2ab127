"""FlexLoRA: full-size synthesis of heterogeneous-rank updates, redistributed by SVD.

Bai, Chen, Shen, Li. "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources." NeurIPS 2024, arXiv:2402.11505.

Per module: ``dW = sum_k p_k * s_k * B_k @ A_k`` with ``p_k = n_k / sum_j n_j`` and the client's
own scale ``s_k = alpha_k / r_k`` applied before averaging; ``dW = U S V^T``; a client of rank r
receives ``B = U_r S_r / s_r, A = V_r^T`` (all singular values in B, as in the paper) or the
``sqrt`` split ``B = U_r S_r^(1/2) / s_r, A = S_r^(1/2) V_r^T``. Either way ``s_r B A`` is the best
rank-r approximation of ``dW`` (Eckart-Young). The SVD is exact and never forms ``dW`` when the
stacked rank is below the layer width (see :mod:`flexlora.lowrank`).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch

from flexlora.lowrank import Svd, SvdPath, map_modules, svd_of_sum
from flexlora.methods.base import AggregationMethod, ModuleSums
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class FlexLoRA(AggregationMethod):
    name = "flexlora"
    paper = "Bai et al., NeurIPS 2024 (arXiv:2402.11505)"
    dp_release = "sum"  # the SVD only post-processes the (noised) weighted sum
    shares_text = (
        "each input's best approximation of the global update at its own ranks (the top singular triplets of the "
        "weighted sum, singular values in B): the adapter that input's client continues from"
    )

    def __init__(
        self,
        singular_values: Literal["B", "sqrt"] = "B",
        svd_path: SvdPath = "auto",
        keep_rank: int | None = None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dtype=dtype, seed=seed, device=device)
        if singular_values not in ("B", "sqrt"):
            raise ValueError(f"singular_values must be 'B' (paper) or 'sqrt', got {singular_values!r}")
        if keep_rank is not None and keep_rank < 1:
            raise ValueError(f"keep_rank must be >= 1 or None, got {keep_rank}")
        self.singular_values = singular_values
        self.svd_path = svd_path
        # None keeps the exact aggregate (every triplet); an int keeps only the top ``keep_rank``
        # triplets, enough to serve every client up to that rank, at lower server time and memory.
        self.keep_rank = keep_rank

    @property
    def exact_aggregate(self) -> bool:
        return self.keep_rank is None

    def aggregate(
        self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0, noise: Mapping[str, torch.Tensor] | None = None
    ) -> ServerState:
        updates, p = self._prepare(updates, weights)

        def synthesise(name: str) -> tuple[GlobalModule, str]:
            factors = [u.modules[name] for u in updates]  # p_k s_k goes on B as the stack is built (one pass)
            Bs, As = [f.B.to(self.device) for f in factors], [f.A.to(self.device) for f in factors]
            coeffs = [pk * f.scale for pk, f in zip(p, factors)]
            dense = None if noise is None else noise[name]
            svd = svd_of_sum(Bs, As, coeffs, path=self.svd_path, dtype=self.dtype, keep=self.keep_rank, dense=dense)
            return self._global(svd), svd.path

        names = list(updates[0].modules)
        done = dict(zip(names, map_modules(synthesise, names, self.device)))  # modules are independent
        adapter = {name: gm for name, (gm, _) in done.items()}
        paths = {name: path for name, (_, path) in done.items()}
        return self.round_state(round, adapter, updates, p, svd_paths=paths)

    def streaming_accumulator(self) -> "FlexLoRASum":
        return FlexLoRASum(self)

    def _global(self, svd: Svd) -> GlobalModule:
        """The global module from the SVD of the weighted sum: all singular values in B, or the sqrt split."""
        k = svd.U.shape[1]
        U, S, Vh = svd.U, svd.S[:k], svd.Vh
        if self.singular_values == "B":
            B, A = U * S, Vh
        else:
            root = S.sqrt()
            B, A = U * root, root[:, None] * Vh
        return GlobalModule(A=A.contiguous(), B=B.contiguous(), spectrum=svd.S)


class FlexLoRASum(ModuleSums):
    """FlexLoRA's weighted sum folded as the updates arrive, one :class:`~flexlora.lowrank.LowRankSum`
    per module (the clients' factors while the stacked rank is small, the dense sum beyond); the SVD
    and redistribution at the end are :meth:`FlexLoRA.aggregate`'s. Rounds whose stacked rank keeps
    the factored path give the same bits as ``aggregate``; denser ones the same to rounding (the
    dense sum adds the clients' products one by one, not one product of the whole stack)."""

    method: FlexLoRA

    def add_module(self, update: ClientUpdate, name: str, weight: float) -> None:
        f = update.modules[name]
        self.sums[name].add(f.B, f.A, weight, f.scale)

    def finish(self, round: int = 0) -> ServerState:
        p = self.normalised()
        m = self.method

        def synthesise(name: str) -> tuple[GlobalModule, str]:
            svd = self.sums.pop(name).svd(keep=m.keep_rank)  # the module's sum is freed as soon as it is used
            return m._global(svd), svd.path

        names = list(self.skeleton.modules)
        done = dict(zip(names, map_modules(synthesise, names, m.device)))
        adapter = {name: gm for name, (gm, _) in done.items()}
        paths = {name: path for name, (_, path) in done.items()}
        return m.round_state(round, adapter, self.client_ids, p, svd_paths=paths)
