"""Homogeneous FedAvg of LoRA factors, as in FedIT.

Zhang et al. "Towards Building the Federated GPT: Federated Instruction Tuning." ICASSP 2024,
arXiv:2305.05644 (FedAvg: McMahan et al., AISTATS 2017).

Every client trains the same rank; the server averages A and B separately with data-size
weights. This is not the average of the updates (mean(B) mean(A) != mean(B A)), and it
cannot mix ranks: the whole federation trains at the rank its weakest client affords (the
"bucket effect" FlexLoRA removes). Mixed ranks are refused with a clear error.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flexlora.methods.base import Accumulator, AggregationMethod, scaled_factors
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class FedAvg(AggregationMethod):
    name = "fedavg"
    paper = "Zhang et al., FedIT, ICASSP 2024 (arXiv:2305.05644)"
    supports_heterogeneous_ranks = False
    dp_release = "factors"  # the averaged A and B are what the server releases
    shares_text = (
        "the weighted averages of the inputs' A and of their scaled B (FedIT), the same adapter in every folder: what every "
        "client continues from (its product is not the average of the inputs' products)"
    )

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        updates, p = self._prepare(updates, weights)
        self.check_specs([u.spec() for u in updates], labels=[f"client {u.client_id}" for u in updates])
        adapter: dict[str, GlobalModule] = {}
        for name in updates[0].modules:
            pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
            # The scale is folded into B so clients with different alpha still average their effective B.
            B = sum(w * sB for w, (sB, _) in zip(p, pairs))
            A = sum(w * A for w, (_, A) in zip(p, pairs))
            adapter[name] = GlobalModule(A=A, B=B)
        return self.round_state(round, adapter, updates, p)

    def streaming_accumulator(self) -> "FactorMean":
        return FactorMean(self)


class FactorMean(Accumulator):
    """FedAvg's two weighted sums, ``sum_k w_k s_k B_k`` and ``sum_k w_k A_k``, folded as the updates
    arrive (two factor-sized tensors per module) and divided by ``sum_k w_k`` at the end. The same to
    rounding as ``aggregate`` (which multiplies by the normalised weight before adding), not bit for
    bit. ``shared_A``: FFA-LoRA's check that every client kept the first client's A (which is kept)."""

    def __init__(self, method: AggregationMethod, shared_A: bool = False) -> None:
        super().__init__(method)
        self.shared_A = shared_A
        self.B: dict[str, torch.Tensor] = {}
        self.A: dict[str, torch.Tensor] = {}
        self.first_spec: tuple[str, dict] | None = None

    def fold(self, update: ClientUpdate, weight: float) -> None:
        m = self.method
        label = f"client {update.client_id}"
        if self.first_spec is None:
            self.first_spec = (label, update.spec())
        m.check_specs([self.first_spec[1], update.spec()], labels=[self.first_spec[0], label])
        pairs = {name: scaled_factors(update, name, m.dtype, m.device) for name in update.modules}
        if self.shared_A and self.A:
            for name, (_, A) in pairs.items():
                m.check_shared_A(update.client_id, name, A, self.A[name])
        for name, (sB, A) in pairs.items():
            if name not in self.B:
                self.B[name] = torch.zeros_like(sB)
                if not self.shared_A:
                    self.A[name] = torch.zeros_like(A)
            self.B[name].add_(sB, alpha=weight)
            if self.shared_A:
                self.A.setdefault(name, A.clone())
            else:
                self.A[name].add_(A, alpha=weight)

    def finish(self, round: int = 0) -> ServerState:
        p = self.normalised()
        total = sum(self.weights)
        adapter = {
            name: GlobalModule(A=self.A[name] if self.shared_A else self.A[name] / total, B=self.B[name] / total) for name in self.skeleton.modules
        }
        return self.method.round_state(round, adapter, self.client_ids, p)
