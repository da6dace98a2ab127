"""RoLoRA: alternating optimisation of the LoRA factors, so that averaging the trained one is exact.

Chen, Guo, Ju, Dalal, Zhu, Khisti. "Robust Federated Finetuning of LLMs via Alternating Optimization
of LoRA." NeurIPS 2025, arXiv:2502.01755.

FedIT's average is not the average of the updates, ``mean(B) mean(A) != mean(B A)`` (the paper's
motivation); FFA-LoRA makes it exact by never training A, which costs expressiveness (the paper's
linear-model analysis). RoLoRA trains both, one at a time (its Algorithm 1): while every client
trains A it keeps the B the server sent, and the other way round, so the round's aggregate

    B-round:  B' = sum_k p_k s_k B_k,   A' = A          (A frozen and shared)
    A-round:  A' = sum_k p_k A_k,       B' = B          (B frozen and shared)

equals ``sum_k p_k s_k B_k A_k`` exactly (the paper's exact-aggregation property; only the trained
factor carries information, so only it needs to travel up).

Choices the paper leaves open, and what this file does:

* **Granularity.** The paper's iteration updates A, aggregates, then B, aggregates: two
  communications. Here one federation round is one half of it: round t trains one factor, round
  t + 1 the other (``trained_factors``), so ``rounds = 2T`` is the paper's T iterations.
* **Which factor first.** ``first = "B"`` (default): at PEFT's initialisation B = 0, so a first round
  that trained A with B frozen at zero would have zero gradient and change nothing. ``first = "A"``
  is there for states that start from a nonzero B.
* **Heterogeneous ranks** (the paper uses one rank). They need no refusal: a client of rank ``r_k``
  freezes the first ``r_k`` columns (rows) of the global factor, so ``sum_k p_k s_k B_k A_k`` is still
  the global frozen factor times the zero-padded average of the trained ones, exact. A client of
  smaller rank then starts from the truncated global pair (HetLoRA's distribution).
* **Weights.** Data size (``n_k / sum n_j``), the alpha/r scale on B before averaging, as every
  method here.

A client that changed the factor it was told to keep is refused (as FFA-LoRA's shared A is checked).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from flexlora.methods.base import AggregationMethod, scaled_factors, zero_pad
from flexlora.update import ClientUpdate, GlobalModule, ServerState, UpdateError

Factor = Literal["B", "A"]
FROZEN_TOLERANCE = 1e-5  # relative: the share's B is divided by the client's scale and multiplied back (one rounding)


class RoLoRA(AggregationMethod):
    name = "rolora"
    paper = "Chen et al., NeurIPS 2025 (arXiv:2502.01755)"
    exact_aggregate = True  # one factor frozen and shared: the average of the other is the average of the products
    dp_release = "factors"  # the averaged trained factor is the release (noise goes on it only)
    shares_text = (
        "the factor the inputs shared (kept) and the weighted, zero-padded average of the one they trained, at each input's "
        "ranks: what that input's client continues from, training the other factor next round"
    )

    def __init__(self, first: Factor = "B", dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(dtype=dtype, seed=seed, device=device)
        if first not in ("B", "A"):
            raise ValueError(f"first must be 'B' or 'A', got {first!r}")
        self.first = first

    def trained_factor(self, round: int) -> Factor:
        """The factor clients train in ``round`` (1-based): ``first`` in odd rounds, the other in even ones."""
        other: Factor = "A" if self.first == "B" else "B"
        return self.first if round % 2 == 1 else other

    def trained_factors(self, round: int) -> tuple[str, ...]:
        return (self.trained_factor(round),)

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0) -> ServerState:
        updates, p = self._prepare(updates, weights)
        trained = self.trained_factor(round) if round > 0 else self._shared_one(updates)
        adapter: dict[str, GlobalModule] = {}
        for name in updates[0].modules:
            pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
            r_max = max(A.shape[0] for _, A in pairs)
            widest = next(i for i, (_, A) in enumerate(pairs) if A.shape[0] == r_max)
            if trained == "B":  # A frozen: B' = sum p_k pad(s_k B_k), A' = the shared A
                A = pairs[widest][1]
                self._check_frozen(updates, name, "A", [a for _, a in pairs], A, rows=True)
                B = sum(w * zero_pad(sB, r_max, dim=1) for w, (sB, _) in zip(p, pairs))
            else:  # B frozen: A' = sum p_k pad(A_k), B' = the shared s B
                B = pairs[widest][0]
                self._check_frozen(updates, name, "B", [b for b, _ in pairs], B, rows=False)
                A = sum(w * zero_pad(a, r_max, dim=0) for w, (_, a) in zip(p, pairs))
            adapter[name] = GlobalModule(A=A.clone(), B=B.clone())
        return self.round_state(round, adapter, updates, p, trained=trained)

    def add_factor_noise(self, state: ServerState, std: float, generator: torch.Generator, factors: Sequence[str] | None = None) -> ServerState:
        """DP: noise on the round's trained factor only; the frozen one came from the server unchanged."""
        return super().add_factor_noise(state, std, generator, factors=(self.trained_factor(state.round),) if factors is None else factors)

    def _shared_one(self, updates: Sequence[ClientUpdate]) -> Factor:
        """Outside a run (``round = 0``, e.g. ``flexlora aggregate``): the factor every input shares is the
        frozen one, so the other was trained; inputs that share neither are refused."""
        for trained, frozen, rows in (("B", "A", True), ("A", "B", False)):
            try:
                for name in updates[0].modules:
                    pairs = [scaled_factors(u, name, self.dtype, self.device) for u in updates]
                    parts = [a if rows else b for b, a in pairs]
                    widest = max(parts, key=lambda t: t.shape[0] if rows else t.shape[1])
                    self._check_frozen(updates, name, frozen, parts, widest, rows=rows)
            except UpdateError:
                continue
            return trained  # type: ignore[return-value]
        raise UpdateError(
            "rolora: the inputs share neither lora_A nor lora_B (up to each one's rank); RoLoRA averages "
            "adapters that trained one factor from the same other factor"
        )

    def _check_frozen(self, updates: Sequence[ClientUpdate], name: str, factor: str, parts: list[Tensor], reference: Tensor, rows: bool) -> None:
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        for u, t in zip(updates, parts):
            r = t.shape[0] if rows else t.shape[1]
            ref = reference[:r] if rows else reference[:, :r]
            diff = float((t - ref).abs().max()) if t.numel() else 0.0
            if diff > FROZEN_TOLERANCE * max(scale, 1e-30):
                raise UpdateError(
                    f"rolora: client {u.client_id} changed lora_{factor} of module {name!r} (max difference {diff:.3g}), "
                    f"which this round keeps frozen; RoLoRA clients train only the round's factor (the Strategy sends it as 'trained-factors')"
                )
