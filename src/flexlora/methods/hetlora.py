"""HetLoRA: zero-padding aggregation with norm-based weights, truncation for distribution.

Cho, Liu, Gupta, Joshi, Ahmed. "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models." EMNLP 2024, arXiv:2401.06432.

Server: zero-pad every client's factors to the largest rank, and average them with
"sparsity-weighted" weights proportional to the Frobenius norm of each client's update.
``weighting`` says which norm: ``"norm"`` (default) takes it per module, ``||s_k B_k A_k||_F``, so a
client weighs more in the modules it changed more; ``"client"`` takes one norm per client over all
its modules, ``sqrt(sum_m ||s_k B_k^m A_k^m||_F^2)``, the same weight in every module; ``"data"`` is
data size alone; ``"norm_x_data"`` the product of per-module norm and data size. Public HetLoRA code
does either ``"client"`` or ``"data"`` (the latter without self-pruning); the paper's text does not
say per module or per client (README, "Conventions"). Results are comparable only under the same one.
Distribution: a client of rank r takes the first r columns / rows of the padded average.
Client: rank self-pruning adds ``lambda * ||B[:, q:]||_F * ||A[q:, :]||_F`` with
``q = floor(gamma * r)`` to the loss, and drops the tail when it has become small
(:func:`self_pruning_penalty`, applied in local training with gradients; :func:`self_prune` after it,
which runners apply when ``prune`` is set and remember per client). The client side's settings are
this method's options, beside ``weighting``: ``penalty`` (the paper's lambda; 0, the default, adds
no term), ``gamma`` and ``prune`` (``federation.method_options``; older configs' ``train.hetlora_lambda``,
``train.hetlora_gamma`` and ``train.hetlora_prune`` still load, with a deprecation message).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, Sequence

import torch
from torch import Tensor

from flexlora.lowrank import factored_fro_norm
from flexlora.methods.base import Accumulator, AggregationMethod, LocalPenalty, scaled_factors, zero_pad
from flexlora.update import ClientUpdate, GlobalModule, LoraFactors, ServerState

Weighting = Literal["norm", "client", "data", "norm_x_data"]


class HetLoRA(AggregationMethod):
    name = "hetlora"
    shares_text = (
        "the zero-padded average (weighted as the `weighting` option says; update norms by default) truncated to each "
        "input's ranks (HetLoRA): the adapter that input's client continues from"
    )
    dp_note = "its weights are the clients' update norms, so one client changes every other client's weight"
    paper = "Cho et al., EMNLP 2024 (arXiv:2401.06432)"
    former_train_keys = {"hetlora_lambda": "penalty", "hetlora_gamma": "gamma", "hetlora_prune": "prune"}

    def __init__(
        self,
        weighting: Weighting = "norm",
        penalty: float = 0.0,
        gamma: float = 0.99,
        prune: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        """``penalty`` (lambda >= 0) weighs the self-pruning regulariser in local training (0: none);
        ``gamma`` in (0, 1] is the rank the regulariser and pruning keep, floor(gamma * r); ``prune``
        turns on rank self-pruning between rounds."""
        super().__init__(dtype=dtype, seed=seed, device=device)
        if weighting not in ("norm", "client", "data", "norm_x_data"):
            raise ValueError(f"weighting must be 'norm', 'client', 'data' or 'norm_x_data', got {weighting!r}")
        if not (math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"penalty must be a finite number >= 0, got {penalty}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.weighting = weighting
        self.penalty = float(penalty)
        self.gamma = float(gamma)
        self.prune = bool(prune)

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        updates, p_data = self._prepare(updates, weights)
        adapter: dict[str, GlobalModule] = {}
        module_weights: dict[str, list[float]] = {}
        client_weights = self._client_weights(updates, p_data) if self.weighting == "client" else None
        for name in updates[0].modules:
            pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
            w = client_weights or self._weights([factored_fro_norm(B, A) for B, A in pairs], p_data)
            r_max = max(A.shape[0] for _, A in pairs)
            B = sum(wk * zero_pad(sB, r_max, dim=1) for wk, (sB, _) in zip(w, pairs))
            A = sum(wk * zero_pad(A, r_max, dim=0) for wk, (_, A) in zip(w, pairs))
            adapter[name] = GlobalModule(A=A, B=B)
            module_weights[name] = w
        return self.round_state(round, adapter, updates, p_data, module_weights=module_weights, weighting=self.weighting)

    @property
    def uses_weights(self) -> bool:
        return self.weighting in ("data", "norm_x_data")  # "norm" and "client" weigh by update norms alone

    def streaming_accumulator(self) -> "PaddedMean | None":
        """The padded sums folded as updates arrive, for the weightings ``PaddedMean`` knows (any other
        weighting holds the updates and runs ``aggregate``)."""
        return PaddedMean(self) if self.weighting in ("norm", "data", "norm_x_data") else None

    # -- the client side ---------------------------------------------------------------------------
    def local_penalty(self, train) -> LocalPenalty | None:
        """The self-pruning regulariser, ``penalty * sum over modules of ||B[:, q:]|| ||A[q:, :]||``."""
        if self.penalty <= 0:
            return None
        gamma = self.gamma
        return LocalPenalty(self.penalty, lambda pairs: sum(self_pruning_penalty(A, B, gamma) for A, B in pairs))

    def after_local_training(self, updates, client_state, train):
        """Rank self-pruning (``prune``): a client whose tail norm shrank since its previous round
        drops its tail ranks, and keeps training at the pruned ranks (remembered in ``client_state``)."""
        if not self.prune:
            return list(updates), {}
        tails = client_state.setdefault("hetlora_tails", {})
        ranks = client_state.setdefault("hetlora_ranks", {})
        out, notes = [], {}
        for u in updates:
            pruned, tail, did = self_prune(u, self.gamma, tails.get(u.client_id))
            tails[u.client_id] = tail
            notes[u.client_id] = {"tail_norm": tail}
            if did:
                ranks[u.client_id] = {n: f.rank for n, f in pruned.modules.items()}
                notes[u.client_id]["pruned_ranks"] = dict(ranks[u.client_id])
            out.append(pruned)
        return out, notes

    def cap_spec(self, spec, client_id, client_state):
        """A client that self-pruned trains at its pruned ranks from then on."""
        ranks = client_state.get("hetlora_ranks", {}).get(str(client_id))
        if not ranks:
            return spec
        return {n: replace(s, rank=min(s.rank, ranks.get(n, s.rank))) for n, s in spec.items()}

    def _client_weights(self, updates: Sequence[ClientUpdate], p_data: list[float]) -> list[float]:
        """``weighting = "client"``: one norm per client, of its whole update over all modules."""
        norms = [
            math.sqrt(sum(factored_fro_norm(*scaled_factors(u, name, self.dtype, self.device)) ** 2 for name in u.modules))
            for u in updates
        ]
        return self._weights(norms, p_data)

    def _weights(self, norms: list[float], p_data: list[float]) -> list[float]:
        if self.weighting == "data":
            return list(p_data)
        raw = [n * p for n, p in zip(norms, p_data)] if self.weighting == "norm_x_data" else norms
        total = sum(raw)
        if total <= 0 or not math.isfinite(total):  # every update is zero at this module: fall back to data size
            return list(p_data)
        return [r / total for r in raw]


class PaddedMean(Accumulator):
    """HetLoRA's padded weighted average folded as the updates arrive: per module, the sums of the
    zero-padded ``raw_k s_k B_k`` and ``raw_k A_k`` with the unnormalised weights ``raw_k`` (the
    module's update norm, the data size or their product), grown when a larger rank arrives, divided
    by ``sum_k raw_k`` at the end; the same sums with data-size weights are kept beside them for
    :meth:`HetLoRA._weights`' fallback (every update zero at that module). Factor-sized memory; the
    same as ``aggregate`` to rounding (it multiplies by normalised weights before adding)."""

    method: HetLoRA

    def __init__(self, method: HetLoRA) -> None:
        super().__init__(method)
        self.raw: dict[str, list[float]] = {}  # per module, each client's unnormalised weight
        self.norms: dict[str, list[float]] = {}  # per module, each client's update norm
        self.sums: dict[str, list[Tensor]] = {}  # per module: raw-weighted sB, A, data-weighted sB, A

    def fold(self, update: ClientUpdate, weight: float) -> None:
        m = self.method
        for name in update.modules:
            sB, A = scaled_factors(update, name, m.dtype, m.device)
            norm = factored_fro_norm(sB, A)
            raw = weight if m.weighting == "data" else (norm if m.weighting == "norm" else norm * weight)
            self.raw.setdefault(name, []).append(raw)
            self.norms.setdefault(name, []).append(norm)
            sums = self.sums.setdefault(name, [sB.new_zeros(sB.shape[0], 0), A.new_zeros(0, A.shape[1])] * 2)
            r = max(sums[1].shape[0], A.shape[0])
            sums[:] = [zero_pad(t, r, dim=1 if i % 2 == 0 else 0) for i, t in enumerate(sums)]
            for i, (t, w) in enumerate(((sB, raw), (A, raw), (sB, weight), (A, weight))):
                if i % 2 == 0:
                    sums[i][:, : t.shape[1]].add_(t, alpha=w)
                else:
                    sums[i][: t.shape[0]].add_(t, alpha=w)

    def finish(self, round: int = 0) -> ServerState:
        m = self.method
        p_data = self.normalised()
        total_data = sum(self.weights)
        adapter, module_weights = {}, {}
        for name in self.skeleton.modules:
            raw = self.raw[name]
            total = sum(raw)
            Bw, Aw, Bd, Ad = self.sums.pop(name)
            if m.weighting == "data" or total <= 0 or not math.isfinite(total):  # HetLoRA._weights' fallback
                adapter[name] = GlobalModule(A=Ad / total_data, B=Bd / total_data)
            else:
                adapter[name] = GlobalModule(A=Aw / total, B=Bw / total)
            module_weights[name] = m._weights(self.norms.pop(name), p_data)  # as aggregate records them
        return m.round_state(round, adapter, self.client_ids, p_data, module_weights=module_weights, weighting=m.weighting)


def self_pruning_penalty(A: Tensor, B: Tensor, gamma: float) -> Tensor:
    """HetLoRA's rank self-pruning regulariser for one module, differentiable in A and B.

    ``||B[:, q:]||_F * ||A[q:, :]||_F`` with ``q = floor(gamma * r)``: pushes the tail ranks
    towards zero so the client can drop them. Zero when ``q == r``.
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    q = int(math.floor(gamma * A.shape[0]))
    if q >= A.shape[0]:
        return A.new_zeros(())
    return torch.linalg.matrix_norm(B[:, q:]) * torch.linalg.matrix_norm(A[q:, :])


def self_prune(update: ClientUpdate, gamma: float, previous_tail_norm: float | None) -> tuple[ClientUpdate, float, bool]:
    """HetLoRA's rank self-pruning, run on a client's update after local training.

    The client's tail norm is the sum over its modules of :func:`self_pruning_penalty` (the quantity
    the regulariser pushes down). When it is smaller than at the client's previous round, every module
    drops its tail and keeps rank ``max(1, floor(gamma * r))``; the kept factors keep their scale, so
    the update is ``scale * B[:, :q] @ A[:q]`` exactly. Returns ``(update, tail norm, pruned)``; the
    caller stores the tail norm for the client's next round.
    """
    tail = sum(float(self_pruning_penalty(f.A, f.B, gamma)) for f in update.modules.values())
    if previous_tail_norm is None or not tail < previous_tail_norm:
        return update, tail, False
    modules, pruned = {}, False
    for name, f in update.modules.items():
        q = max(1, int(math.floor(gamma * f.rank)))
        pruned |= q < f.rank
        modules[name] = LoraFactors(A=f.A[:q].clone(), B=f.B[:, :q].clone(), scale=f.scale) if q < f.rank else f
    return replace(update, modules=modules), tail, pruned
