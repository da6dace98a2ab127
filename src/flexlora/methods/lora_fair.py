"""LoRA-FAIR: FedIT's averaged factors, plus a server-side correction of B towards the ideal update.

Bian, Wang, Zhang, Xu. "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement." ICCV 2025, arXiv:2411.14961. No public code.

The paper names two problems. *Server-side aggregation bias*: FedIT's ``B_avg A_avg`` (``B_avg =
sum_k p_k s_k B_k``, ``A_avg = sum_k p_k A_k``) is not the ideal global update ``dW = sum_k p_k s_k
B_k A_k`` (its Eq. for the ideal update). *Client-side initialisation lag*: methods that restart LoRA
every round (FLoRA) or re-factorise it (FlexLoRA) throw away the factors clients had learnt. LoRA-FAIR
keeps the averaged factors and adds a residual correction to B only,

    dB* = argmin_dB  S(dW, (B_avg + dB) A_avg) + lambda * ||dB||          (the paper's correction objective)
    B'  = B_avg + dB*,   A' = A_avg,

and every client starts its next round from ``(B', A')`` (the paper's "Avg-Initial"), so nothing is
merged into the base weights and nothing grows with the number of clients.

Choices the paper leaves open, and what this file does:

* **The objective.** ``S`` is taken as the squared Frobenius distance and the regulariser as
  ``mu ||dB||_F^2`` (ridge), with ``mu = regularization * tr(A' A'^T) / r`` so the option is free of
  the factors' scale. Then the objective has one closed-form minimiser,

      dB* = (dW - B_avg A_avg) A_avg^T (A_avg A_avg^T + mu I)^-1,

  computed without forming the d_out x d_in update: ``dW A_avg^T = sum_k p_k s_k B_k (A_k A_avg^T)``
  takes r x r Gram matrices only (float64). The paper solves its objective iteratively on the
  server; a closed form gives the same minimiser without a learning rate or a step count to choose.
  Since ``dB = 0`` is feasible, the corrected product is never further from ``dW`` than FedIT's, and
  with ``regularization = 0`` it is the projection of ``dW`` onto the row space of ``A_avg``, the
  closest any correction of B alone can get.
* **The regulariser weight.** ``regularization = 0.01`` (default): the paper keeps dB small so
  that ``B'`` stays close to the clients' average (what they all start from next round); 1% of the
  mean eigenvalue of ``A_avg A_avg^T`` removes nearly all of the bias the row space allows and keeps
  the solve well conditioned when ``A_avg`` is close to rank deficient.
* **Heterogeneous ranks** are refused, as FedIT refuses them: the paper builds on FedIT's one rank,
  and zero-padding (HetLoRA's way) would hand a smaller client a truncated ``B'`` whose correction was
  fitted at the largest rank, so "clients continue from the corrected factors" would hold for the
  largest clients only. Use flexlora, hetlora, rank_partition or rolora for mixed ranks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from flexlora.methods.base import modules_on_cpu, scaled_factors
from flexlora.methods.fedavg import FedAvg
from flexlora.update import ClientUpdate, GlobalModule, ServerState

F64 = torch.float64


class LoRAFAIR(FedAvg):
    """FedIT's averages, with B corrected towards the exact weighted sum; clients continue from them."""

    name = "lora_fair"
    paper = "Bian et al., ICCV 2025 (arXiv:2411.14961)"
    dp_release = None  # the correction is fitted to every client's own product
    dp_note = "its correction is fitted to every client's own product B_k A_k, which noise on the averaged factors does not cover"
    shares_text = (
        "the weighted average of the inputs' A and their averaged scaled B plus LoRA-FAIR's correction, the same adapter "
        "in every folder: what every client continues from (closer to the weighted sum of the inputs' products than FedIT's average)"
    )

    def __init__(self, regularization: float = 0.01, dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(dtype=dtype, seed=seed, device=device)
        if not (math.isfinite(regularization) and regularization >= 0):
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization}")
        self.regularization = float(regularization)

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        state = super().aggregate(updates, weights, round)  # checks the ranks, averages s B and A (FedIT)
        p = [state.weights[u.client_id] for u in updates]
        corrected: dict[str, GlobalModule] = {}
        relative: dict[str, float] = {}
        for name, mean in state.adapter.items():
            pairs = [scaled_factors(u, name, F64, self.device) for u in updates]
            B_avg, A_avg = mean.B.to(self.device, F64), mean.A.to(self.device, F64)
            dB = correction(pairs, p, B_avg, A_avg, self.regularization)
            B = B_avg + dB
            corrected[name] = GlobalModule(A=mean.A, B=B.to(self.dtype))
            norm = float(torch.linalg.matrix_norm(B_avg))
            relative[name] = float(torch.linalg.matrix_norm(dB)) / norm if norm > 0 else 0.0
        state.adapter = modules_on_cpu(corrected)
        state.info.update(regularization=self.regularization, correction_rel_norm=relative)
        return state


def correction(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], p: Sequence[float], B_avg: torch.Tensor, A_avg: torch.Tensor, regularization: float) -> torch.Tensor:
    """LoRA-FAIR's ``dB``: the minimiser of ``||sum_k p_k sB_k A_k - (B_avg + dB) A_avg||_F^2 + mu ||dB||_F^2``
    with ``mu = regularization * tr(A_avg A_avg^T) / r``, from r x r Gram matrices (``pairs``: (s_k B_k, A_k))."""
    G = A_avg @ A_avg.T  # r x r
    target = sum(w * (sB @ (A @ A_avg.T)) for w, (sB, A) in zip(p, pairs))  # dW A_avg^T without forming dW
    rhs = target - B_avg @ G  # (dW - B_avg A_avg) A_avg^T
    r = G.shape[0]
    mu = regularization * float(torch.trace(G)) / max(r, 1)
    if mu > 0:
        eye = torch.eye(r, dtype=G.dtype, device=G.device)
        return torch.linalg.solve(G + mu * eye, rhs.T).T  # G is symmetric
    return rhs @ torch.linalg.pinv(G, hermitian=True)  # regularization = 0: the least-squares projection
