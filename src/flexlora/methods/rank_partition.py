"""Rank-partition reweighting: average column j only over the clients that have it.

After RB-LoRA and raFLoRA (2025-26): zero-padding (HetLoRA) divides the high-rank columns by
clients that never trained them, which dilutes what the rich clients learned and drives the
energy into the smallest shared rank ("rank collapse"). Here column j of ``s_k B_k`` and row j
of ``A_k`` are averaged only over the clients with ``r_k > j``, with their data-size weights
renormalised within that partition. Redistribution truncates (``redistribute="truncate"``) or
takes the SVD of the reweighted product (``"svd"``) so that truncation is optimal.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from flexlora.lowrank import svd_of_product
from flexlora.methods.base import Accumulator, AggregationMethod, scaled_factors, zero_pad
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class RankPartition(AggregationMethod):
    name = "rank_partition"
    dp_note = "each column is divided by the number of clients that have it, so one client changes another's weight"
    paper = "RB-LoRA / raFLoRA rank-partition reweighting (2025-26)"
    shares_text = (
        "the rank-partition average (column j averaged over the inputs that have it) cut to each input's ranks: the "
        "adapter that input's client continues from"
    )

    def __init__(self, redistribute: Literal["truncate", "svd"] = "truncate", dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(dtype=dtype, seed=seed, device=device)
        if redistribute not in ("truncate", "svd"):
            raise ValueError(f"redistribute must be 'truncate' or 'svd', got {redistribute!r}")
        self.redistribute = redistribute

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        updates, p = self._prepare(updates, weights)
        adapter: dict[str, GlobalModule] = {}
        for name in updates[0].modules:
            pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
            ranks = torch.tensor([A.shape[0] for _, A in pairs])
            r_max = int(ranks.max())
            d_out, d_in = pairs[0][0].shape[0], pairs[0][1].shape[1]
            B = torch.zeros(d_out, r_max, dtype=self.dtype, device=self.device)
            A = torch.zeros(r_max, d_in, dtype=self.dtype, device=self.device)
            col_weight = torch.zeros(r_max, dtype=self.dtype, device=self.device)
            for w, (sB, Ak) in zip(p, pairs):
                r = Ak.shape[0]
                B[:, :r] += w * sB
                A[:r] += w * Ak
                col_weight[:r] += w
            adapter[name] = self._global(B, A, col_weight)
        return self.round_state(round, adapter, updates, p, redistribute=self.redistribute)

    def _global(self, B: torch.Tensor, A: torch.Tensor, col_weight: torch.Tensor) -> GlobalModule:
        B /= col_weight  # every column j <= r_max has at least one owner, so no zero division
        A /= col_weight[:, None]
        if self.redistribute == "svd":
            svd = svd_of_product(B, A)
            return GlobalModule(A=svd.Vh, B=svd.U * svd.S, spectrum=svd.S)
        return GlobalModule(A=A, B=B)

    def streaming_accumulator(self) -> "PartitionSums":
        return PartitionSums(self)


class PartitionSums(Accumulator):
    """The column sums ``sum_{k: r_k > j} w_k s_k B_k[:, j]`` (and A's rows) with their weights,
    folded as the updates arrive with unnormalised weights (grown when a larger rank arrives):
    factor-sized memory. Column j is divided by its own weight sum, so normalising first or not is
    the same to rounding (``aggregate`` adds normalised weights), not bit for bit."""

    method: RankPartition

    def __init__(self, method: RankPartition) -> None:
        super().__init__(method)
        self.sums: dict[str, list[torch.Tensor]] = {}  # per module: B, A, column weights

    def fold(self, update: ClientUpdate, weight: float) -> None:
        m = self.method
        for name in update.modules:
            sB, Ak = scaled_factors(update, name, m.dtype, m.device)
            r = Ak.shape[0]
            if name not in self.sums:
                self.sums[name] = [sB.new_zeros(sB.shape[0], 0), Ak.new_zeros(0, Ak.shape[1]), Ak.new_zeros(0)]
            B, A, col = self.sums[name]
            if r > A.shape[0]:
                B, A, col = zero_pad(B, r, 1), zero_pad(A, r, 0), zero_pad(col, r, 0)
                self.sums[name] = [B, A, col]
            B[:, :r] += weight * sB
            A[:r] += weight * Ak
            col[:r] += weight

    def finish(self, round: int = 0) -> ServerState:
        p = self.normalised()
        adapter = {name: self.method._global(*self.sums.pop(name)) for name in self.skeleton.modules}
        return self.method.round_state(round, adapter, self.client_ids, p, redistribute=self.method.redistribute)
