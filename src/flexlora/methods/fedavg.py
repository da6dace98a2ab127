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

from flexlora.methods.base import AggregationMethod, scaled_factors
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
        return self._state(round, adapter, updates, p)
