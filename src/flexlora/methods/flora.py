"""FLoRA: exact aggregation by stacking, merged into the base weights every round.

Wang, Shen, Chen, Deng, Li, Wang. "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations." NeurIPS 2024, arXiv:2409.05976.

``B = [p_1 s_1 B_1, ..., p_K s_K B_K]`` and ``A = [A_1; ...; A_K]`` so that ``B @ A`` is exactly
``sum_k p_k s_k B_k A_k`` (noise-free, any mix of ranks). The stacked update is not a LoRA
of any client's rank: every client merges it into its base weights and restarts LoRA from
a fresh initialisation. So the state's ``base_delta`` carries the stack and its ``adapter``
is empty (every share is a fresh init). Download size grows with the number of clients.
"""

from __future__ import annotations

from typing import Sequence

from flexlora.lowrank import stack_factors
from flexlora.methods.base import AggregationMethod, modules_on_cpu, scaled_factors
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class FLoRA(AggregationMethod):
    name = "flora"
    paper = "Wang et al., NeurIPS 2024 (arXiv:2409.05976)"

    exact_aggregate = True
    merges_into_base = True
    restarts_adapter = True

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        updates, p = self._prepare(updates, weights)
        stacked: dict[str, GlobalModule] = {}
        for name in updates[0].modules:
            Bs, As = zip(*(scaled_factors(u, name, self.dtype, self.device) for u in updates))
            B, A = stack_factors(Bs, As, p, self.dtype)
            stacked[name] = GlobalModule(A=A, B=B)
        shapes = {name: (gm.d_out, gm.d_in) for name, gm in stacked.items()}
        state = self.initial_state(shapes, round=round)  # fresh LoRA for everybody next round
        state.base_delta = modules_on_cpu(stacked)
        state.weights = {u.client_id: float(w) for u, w in zip(updates, p)}
        state.info["merge_into_base"] = True
        return state
