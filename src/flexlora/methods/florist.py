"""FLoRIST: the stacked update, truncated to the global rank that keeps a given share of its energy.

Ramesh et al. "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated Fine-Tuning
of Large Language Models." MLSys 2026, arXiv:2506.09199.

As in FLoRA, the server stacks the clients' weighted factors, ``dW = [p_1 s_1 B_1, ..., p_K s_K B_K]
@ [A_1; ...; A_K]`` (any mix of ranks), and every client merges the global update into its base
weights and restarts LoRA from a fresh initialisation. FLoRIST does not ship the stack: it takes the
SVD of the stacked product without forming ``dW`` (the paper: an SVD of each stack and of the small
core; here the same exact SVD through thin QRs, :mod:`flexlora.lowrank`) and keeps the smallest rank
``k`` whose singular values hold at least ``threshold`` of the energy, ``sum_{i<=k} s_i^2 / sum s_i^2``.
The rank is chosen per module; ``threshold = 1`` keeps every nonzero direction (FLoRA's exact update,
at its own rank).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from flexlora.lowrank import Svd, SvdPath, svd_of_sum
from flexlora.methods.base import AggregationMethod, ModuleSums, modules_on_cpu, scaled_factors
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class FLoRIST(AggregationMethod):
    name = "florist"
    paper = "Ramesh et al., MLSys 2026 (arXiv:2506.09199)"
    merges_into_base = True
    restarts_adapter = True
    shares_text = (
        "fresh LoRA initialisations (B = 0) at each input's ranks, not the aggregate: merge global/ (the stacked update cut "
        "to the rank that keeps `threshold` of its energy) into the base weights first, then every client trains its folder "
        "on the merged model"
    )
    dp_release = "sum"  # the stacked SVD and the energy threshold only post-process the (noised) sum

    def __init__(self, threshold: float = 0.9, svd_path: SvdPath = "auto", dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(dtype=dtype, seed=seed, device=device)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.svd_path = svd_path

    @property
    def exact_aggregate(self) -> bool:
        return False  # truncated on purpose (at threshold 1 exact only up to the SVD's rounding)

    def aggregate(
        self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0, noise: Mapping[str, torch.Tensor] | None = None
    ) -> ServerState:
        updates, p = self._prepare(updates, weights)
        kept: dict[str, GlobalModule] = {}
        ranks: dict[str, int] = {}
        for name in updates[0].modules:
            Bs, As = zip(*(scaled_factors(u, name, self.dtype, self.device) for u in updates))
            svd = svd_of_sum(Bs, As, p, path=self.svd_path, dtype=self.dtype, dense=None if noise is None else noise[name])
            kept[name], ranks[name] = self._kept(svd)
        return self._merged_state(round, kept, ranks, [u.client_id for u in updates], p)

    def _kept(self, svd: Svd) -> tuple[GlobalModule, int]:
        k = energy_rank(svd.S, self.threshold)
        return GlobalModule(A=svd.Vh[:k].contiguous(), B=(svd.U[:, :k] * svd.S[:k]).contiguous(), spectrum=svd.S), k

    def _merged_state(self, round: int, kept: dict[str, GlobalModule], ranks: dict[str, int], client_ids: Sequence[str], p: Sequence[float]) -> ServerState:
        shapes = {name: (gm.d_out, gm.d_in) for name, gm in kept.items()}
        state = self.initial_state(shapes, round=round)  # fresh LoRA for everybody next round
        state.base_delta = modules_on_cpu(kept)
        state.weights = {cid: float(w) for cid, w in zip(client_ids, p)}
        state.info.update(merge_into_base=True, global_ranks=ranks, threshold=self.threshold)
        return state

    def streaming_accumulator(self) -> "StackedSum":
        return StackedSum(self)


class StackedSum(ModuleSums):
    """FLoRIST's stacked sum folded as the updates arrive (a :class:`~flexlora.lowrank.LowRankSum`
    per module: the factors while the stacked rank is small, the dense sum beyond), then the same
    SVD and energy threshold. The same bits as ``aggregate`` where the factored path is kept, the
    same to rounding where the sum went dense."""

    method: FLoRIST

    def add_module(self, update: ClientUpdate, name: str, weight: float) -> None:
        sB, A = scaled_factors(update, name, self.method.dtype, self.method.device)
        self.sums[name].add(sB, A, weight)  # coefficient p_k on s_k B_k, as aggregate's stack

    def finish(self, round: int = 0) -> ServerState:
        p = self.normalised()
        kept, ranks = {}, {}
        for name in self.skeleton.modules:
            kept[name], ranks[name] = self.method._kept(self.sums.pop(name).svd())
        return self.method._merged_state(round, kept, ranks, self.client_ids, p)


def energy_rank(S: torch.Tensor, threshold: float) -> int:
    """The smallest k with ``sum_{i<k} S_i^2 >= threshold * sum S_i^2`` (at least 1).

    ``threshold = 1`` keeps every nonzero singular value: the rounding tolerance below would drop
    directions holding less than 1e-12 of the energy (singular values under 1e-6 of the largest),
    a 1e-6 relative error in what is meant to be FLoRA's exact update (found by hypothesis)."""
    energy = S.double().square()
    total = float(energy.sum())
    if total <= 0:
        return 1
    if threshold >= 1:
        return max(1, int((S > 0).sum()))
    cum = torch.cumsum(energy, 0) / total
    reached = (cum >= threshold - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(S.numel())
