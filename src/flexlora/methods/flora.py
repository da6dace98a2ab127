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

from typing import Mapping, Sequence

import torch

from flexlora.lowrank import stack_factors
from flexlora.methods.base import AggregationMethod, modules_on_cpu, scaled_factors
from flexlora.update import ClientUpdate, GlobalModule, ServerState


class FLoRA(AggregationMethod):
    name = "flora"
    paper = "Wang et al., NeurIPS 2024 (arXiv:2409.05976)"

    exact_aggregate = True
    merges_into_base = True
    restarts_adapter = True
    shares_text = (
        "fresh LoRA initialisations (B = 0) at each input's ranks, not the aggregate: merge global/ (the exact stacked "
        "update) into the base weights first, then every client trains its folder on the merged model"
    )
    dp_release = "sum"  # the stack is the weighted sum; DP noise joins it as one more full-rank term

    def aggregate(
        self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0, noise: Mapping[str, torch.Tensor] | None = None
    ) -> ServerState:
        updates, p = self._prepare(updates, weights)
        stacked: dict[str, GlobalModule] = {}
        for name in updates[0].modules:
            Bs, As = zip(*(scaled_factors(u, name, self.dtype, self.device) for u in updates))
            coeffs = list(p)
            if noise is not None:  # N = N @ I (or I @ N): the smaller identity keeps the stack small
                N = noise[name].to(self.device, self.dtype)
                eye = torch.eye(min(N.shape), dtype=self.dtype, device=self.device)
                extra_B, extra_A = (N, eye) if N.shape[0] >= N.shape[1] else (eye, N)
                Bs, As, coeffs = (*Bs, extra_B), (*As, extra_A), [*coeffs, 1.0]
            B, A = stack_factors(Bs, As, coeffs, self.dtype)
            stacked[name] = GlobalModule(A=A, B=B)
        shapes = {name: (gm.d_out, gm.d_in) for name, gm in stacked.items()}
        state = self.initial_state(shapes, round=round)  # fresh LoRA for everybody next round
        state.base_delta = modules_on_cpu(stacked)
        state.weights = {u.client_id: float(w) for u, w in zip(updates, p)}
        state.info["merge_into_base"] = True
        return state
