"""FFA-LoRA: a frozen, shared random A; only B is trained and averaged.

Sun, Qin, Li, Ding, Li. "Improving LoRA in Privacy-preserving Federated Learning." ICLR 2024,
arXiv:2403.12313.

With A fixed and identical on every client, ``mean(B) A == mean(B A)``: averaging B alone is
exact, halves the upload, and suits differential privacy. Clients must share A (it comes from
the server's initial state) and therefore one rank per module; both are checked.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flexlora.methods.base import Accumulator, AggregationMethod, scaled_factors
from flexlora.methods.fedavg import FactorMean
from flexlora.update import ClientUpdate, GlobalModule, ServerState, UpdateError


class FFALoRA(AggregationMethod):
    name = "ffa"
    paper = "Sun et al., ICLR 2024 (arXiv:2403.12313)"
    supports_heterogeneous_ranks = False
    exact_aggregate = True  # one shared A: mean(B) A == mean(B A)
    dp_release = "factors"
    dp_noised_factors = ("B",)  # A is the shared, data-independent init
    shares_text = "the shared frozen A and the weighted average of B, the same in every folder: every client continues training B only"

    def trained_factors(self, round: int) -> tuple[str, ...]:
        """FFA-LoRA is defined by a frozen ``lora_A``: clients train B only."""
        return ("B",)

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        updates, p = self._prepare(updates, weights)
        self.check_specs([u.spec() for u in updates], labels=[f"client {u.client_id}" for u in updates])
        adapter: dict[str, GlobalModule] = {}
        for name in updates[0].modules:
            pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
            A0 = pairs[0][1]
            for u, (_, A) in zip(updates, pairs):
                self.check_shared_A(u.client_id, name, A, A0)
            B = sum(w * sB for w, (sB, _) in zip(p, pairs))
            adapter[name] = GlobalModule(A=A0.clone(), B=B)
        return self.round_state(round, adapter, updates, p)

    def streaming_accumulator(self) -> Accumulator:
        """B's weighted sum folded as the updates arrive; the first client's A is kept and every
        other A is checked against it (``FactorMean``)."""
        return FactorMean(self, shared_A=True)

    @staticmethod
    def check_shared_A(client_id: str, name: str, A: torch.Tensor, A0: torch.Tensor) -> None:
        if not torch.equal(A, A0):
            raise UpdateError(
                f"ffa: client {client_id} changed the frozen lora_A of module {name!r}"
                f" (max difference {float((A - A0).abs().max()):.3g}); FFA-LoRA needs one shared A"
            )
