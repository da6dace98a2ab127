"""FedEx-LoRA: average A and B, and add the exact residual to the frozen base weights.

Singhal, Ponkshe, Vepakomma. "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models." ACL 2025, arXiv:2410.09432.

Every client trains the same rank. The server averages the factors as FedIT does (``B = sum p_k s_k
B_k``, ``A = sum p_k A_k``), which every client continues from, and puts the error that averaging
makes, ``sum_k p_k s_k B_k A_k - B A``, into everybody's base weights. Adapter plus residual is the
exact weighted average of the clients' updates. The residual is held exactly as stacked factors,
``[p_1 s_1 B_1, ..., p_K s_K B_K, -B] @ [A_1; ...; A_K; A]`` (rank at most (K + 1) r), so nothing
dense is formed on the server; clients merge it as FLoRA's clients merge their stack.
"""

from __future__ import annotations

from typing import Sequence

from flexlora.lowrank import stack_factors
from flexlora.methods.base import modules_on_cpu, scaled_factors
from flexlora.methods.fedavg import FedAvg
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class FedExLoRA(FedAvg):
    """FedAvg's averaged factors, plus the residual that averaging leaves, merged into the base weights."""

    name = "fedex"
    paper = "Singhal et al., ACL 2025 (arXiv:2410.09432)"
    exact_aggregate = True  # adapter + residual = sum p_k s_k B_k A_k
    dp_release = None  # the residual needs the un-noised individual products
    dp_note = "its residual is computed from every client's own product, which noise on the averaged factors does not cover"
    merges_into_base = True  # the residual; the averaged adapter is kept (LoRA is not restarted)
    shares_text = (
        "the weighted averages of the inputs' scaled B and of their A, the same adapter in every folder, which every client "
        "continues from on a base model with base_update/ (the residual that averaging leaves) merged in; global/ (averaged "
        "adapter + residual) is the exact aggregate on the original base, for evaluation: never add a folder's adapter to it"
    )

    def streaming_accumulator(self) -> None:
        """Not folded: the residual is released as the exact stack of every client's factors (by
        design, as FLoRA's stack), so the server holds them all whatever the order of arrival."""
        return None

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        state = super().aggregate(updates, weights, round)  # checks the ranks, averages A and s B
        p = [state.weights[u.client_id] for u in updates]
        residual: dict[str, GlobalModule] = {}
        for name, mean in state.adapter.items():
            pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
            # sum_k p_k (s_k B_k) A_k - mean(s B) mean(A), as one product of stacked factors
            Bs = [sB for sB, _ in pairs] + [mean.B.to(self.device, self.dtype)]
            As = [A for _, A in pairs] + [mean.A.to(self.device, self.dtype)]
            res_B, res_A = stack_factors(Bs, As, [*p, -1.0], self.dtype)
            residual[name] = GlobalModule(A=res_A, B=res_B)
        state.base_delta = modules_on_cpu(residual)
        state.info["merge_into_base"] = True
        return state
