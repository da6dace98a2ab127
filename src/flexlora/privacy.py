"""Central user-level differential privacy for heterogeneous-rank LoRA (a trusted server).

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018) applied where FlexLoRA makes it clean: the server holds the exact full-size
weighted sum of the clients' effective updates before it redistributes anything. Per round:

1. **Clip the change.** What client k contributes is how far it moved from the share it was
   served: ``U_k = s_k B_k A_k - S_k`` for a "sum" method (FlexLoRA, FLoRIST, FLoRA; its Frobenius
   norm over every module computed exactly in factored form), the change of its factors for a
   "factors" method (FedAvg/FedIT, FFA-LoRA: the averaged factors are what is released). It is
   scaled by ``c_k = min(1, C / ||U_k||)``. Clipping the whole product instead would clip the
   share the client was served (noise included) again every round, so the global update could
   never grow past C.
2. **Sum with a fixed denominator.** The new global update is the previous one (public: it was
   released last round) plus ``sum_k c_k U_k / m``, with ``m`` the configured clients per round
   (the expected count under Poisson sampling), so one client moves it by at most ``C / m`` whoever
   else came (add/remove neighbours; ``2C / m`` when one is replaced). Without noise (clipping as a
   robustness option) the method's data-size weights are kept instead of ``1 / m``.
3. **Noise.** Gaussian noise of std ``z * C / m`` on every entry of what is released: the dense sum
   for a "sum" method (FlexLoRA, FLoRIST, FLoRA), *before* the SVD, so truncation to each client's
   rank is post-processing; the averaged factors for a "factors" method.
4. **Account.** Poisson sampling at rate ``q = m / N`` with add/remove neighbours, or fixed-size
   sampling of m out of N with replace-one neighbours (noise multiplier ``z / 2`` there: replacing a
   client moves the sum by up to ``2C / m``); epsilon at the configured delta from Google's
   ``dp_accounting`` RDP accountant, not hand-written.

Not protected: the trusted server's own log (``metrics.jsonl`` holds per-client losses and clipping
counts), a server that does not follow the protocol, and floating-point attacks on the Gaussian
sampler (``torch.randn`` is not a cryptographically secure generator).
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from flexlora.lowrank import factored_distance
from flexlora.methods.base import AggregationMethod
from flexlora.update import ClientUpdate, GlobalModule, LoraFactors


@dataclass(frozen=True)
class Mechanism:
    """One round's DP parameters: clipping bound, noise multiplier, the fixed denominator."""

    clip_norm: float
    noise_multiplier: float
    denominator: int  # m: the configured (expected) number of clients per round

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm / self.denominator


@dataclass
class PrivateRound:
    """What the method aggregates under DP, and what the round record says about it."""

    updates: list[ClientUpdate]
    weights: list[float]  # uniform: the coefficients sit on the terms' B
    noise: dict[str, Tensor] | None = None  # "sum" methods: the dense term added to the sum
    record: dict[str, Any] = field(default_factory=dict)


def effective_change_norm(u: ClientUpdate, served: Mapping[str, LoraFactors]) -> float:
    """``sqrt(sum_modules ||s B A - s' B' A'||_F^2)``: how far the client moved the product it was served, exact."""
    total = 0.0
    for name, f in u.modules.items():
        g = served[name]
        total += factored_distance(f.scale * f.B.double(), f.A.double(), g.scale * g.B.double(), g.A.double()) ** 2
    return math.sqrt(total)


def factor_change_norm(u: ClientUpdate, served: Mapping[str, LoraFactors]) -> float:
    """Joint Frobenius norm of ``(s (B - B_served), A - A_served)`` over every module."""
    total = 0.0
    for name, f in u.modules.items():
        total += float(torch.sum((f.scale * (f.B.double() - served[name].B.double())) ** 2))
        total += float(torch.sum((f.A.double() - served[name].A.double()) ** 2))
    return math.sqrt(total)


def _term(client_id: str, modules: Mapping[str, LoraFactors], coeff: float) -> ClientUpdate:
    """One term ``coeff * s B A`` of the released sum, as an update (the coefficient goes on B)."""
    mods = {n: LoraFactors(A=f.A, B=f.B * coeff, scale=f.scale) for n, f in modules.items()}
    return ClientUpdate(client_id=client_id, num_examples=1, modules=mods)


def _moved(u: ClientUpdate, served: Mapping[str, LoraFactors], factor: float) -> ClientUpdate:
    """``served + factor * (u - served)``, factor by factor."""
    if factor == 1.0:
        return u
    mods = {}
    for n, f in u.modules.items():
        s = served[n]
        mods[n] = LoraFactors(A=s.A.to(f.A.dtype) + factor * (f.A - s.A.to(f.A.dtype)), B=s.B.to(f.B.dtype) + factor * (f.B - s.B.to(f.B.dtype)), scale=f.scale)
    return replace(u, modules=mods)


def privatize(
    updates: Sequence[ClientUpdate],
    method: AggregationMethod,
    mech: Mechanism,
    served: Mapping[str, Mapping[str, LoraFactors]],
    previous: Mapping[str, GlobalModule] | None,
    shapes: Mapping[str, tuple[int, int]],
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> PrivateRound:
    """Clip every client's change, weigh, and draw the noise (None ``generator``: clipping only).

    DP-FedAvg's form: the new global update is the previous one plus the weighted clipped changes
    (``served`` maps a client id to the share it started from; ``previous`` is the global update that
    stays in the adapter, None for methods that merge it into the base weights and restart LoRA).
    For a "sum" method the terms are handed to the method as updates whose coefficients sit on B
    under uniform weights, so its own exact sum, SVD and redistribution run unchanged.
    """
    noisy = generator is not None and mech.noise_multiplier > 0
    by_factors = method.dp_release == "factors"
    norms = [factor_change_norm(u, served[u.client_id]) if by_factors else effective_change_norm(u, served[u.client_id]) for u in updates]
    clip = [min(1.0, mech.clip_norm / n) if (mech.clip_norm > 0 and n > 0) else 1.0 for n in norms]
    # the median norm before clipping: how to pick C (the trusted server's log, not a private release)
    record: dict[str, Any] = {"clip_norm": mech.clip_norm, "clipped": sum(c < 1.0 for c in clip), "of": len(updates), "norm_median": statistics.median(norms) if norms else None}
    if noisy:  # fixed denominator: every client weighs 1/m whoever else came
        record.update(noise_multiplier=mech.noise_multiplier, noise_std=mech.noise_std, denominator=mech.denominator)
        coeffs = [1.0 / mech.denominator] * len(updates)
    else:  # clipping alone keeps the method's own weights
        n = sum(u.num_examples for u in updates)
        coeffs = [u.num_examples / n for u in updates]
    if by_factors:
        # the method averages factors with uniform weights over the count K that came: served + c K w (u - served) / K
        out = [_moved(u, served[u.client_id], c * w * len(updates)) for u, c, w in zip(updates, clip, coeffs)]
        return PrivateRound(out, [1.0] * len(out), None, record)
    terms: list[ClientUpdate] = []
    for u, c, w in zip(updates, clip, coeffs):
        terms.append(_term(u.client_id, u.modules, c * w))
        if any(bool(f.B.any()) for f in served[u.client_id].values()):  # a fresh share (B = 0) adds nothing
            terms.append(_term(f"{u.client_id}:served", served[u.client_id], -c * w))
    if previous is not None and any(gm.rank > 0 for gm in previous.values()):
        terms.append(_term("previous", {n: LoraFactors(A=gm.A, B=gm.B, scale=1.0) for n, gm in previous.items()}, 1.0))
    out = [_term(t.client_id, t.modules, float(len(terms))) for t in terms]  # the method divides by the count
    noise = None
    if noisy:
        noise = {name: (mech.noise_std * torch.randn(shapes[name], generator=generator, dtype=torch.float64)).to(dtype) for name in sorted(shapes)}
    return PrivateRound(out, [1.0] * len(out), noise, record)


def aggregate_private(method: AggregationMethod, private: PrivateRound, round: int, mech: Mechanism, generator: torch.Generator | None):
    """The method's aggregate of a :class:`PrivateRound`: noise inside the sum or on the factors."""
    if private.noise is not None:
        return method.aggregate(private.updates, weights=private.weights, round=round, noise=private.noise)
    state = method.aggregate(private.updates, weights=private.weights, round=round)
    if method.dp_release == "factors" and generator is not None and mech.noise_multiplier > 0:
        state = method.add_factor_noise(state, mech.noise_std, generator)
    return state


# -- accounting (a maintained library, imported only when DP is on) -----------------------------------------
def epsilon(noise_multiplier: float, rounds: int, delta: float, sampling: str, population: int, per_round: int) -> float:
    """epsilon after ``rounds`` rounds at ``delta``, from dp_accounting's RDP accountant.

    ``poisson``: each of ``population`` clients joins a round with probability ``per_round / population``
    (add/remove-one neighbours). ``fixed``: ``per_round`` of ``population`` without replacement
    (replace-one neighbours; the noise multiplier w.r.t. that sensitivity, 2C/m, is z/2)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if rounds <= 0:
        return 0.0
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        accountant = RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(min(1.0, per_round / population), gaussian)
    elif sampling == "fixed":
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(population, per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    else:
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
    # orders whose series does not converge are left out by the library (the bound stays valid); it
    # says so on absl's logger once per order, which would flood every round's output
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return float(accountant.get_epsilon(delta))
    finally:
        absl_log.setLevel(level)


def noise_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
