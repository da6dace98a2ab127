"""Central user-level differential privacy for heterogeneous-rank LoRA (a trusted server).

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018) applied where FlexLoRA makes it clean: the server holds the exact full-size
weighted sum of the clients' effective updates before it redistributes anything. Per round:

1. **Clip.** Client k's whole update (every module) is scaled by ``c_k = min(1, C / ||U_k||)``.
   For a "sum" method ``U_k`` is its effective update ``{s_k B_k A_k}``, its Frobenius norm computed
   exactly in factored form; for a "factors" method (FedAvg/FedIT, FFA-LoRA: the averaged factors are
   what is released) ``U_k`` is the change of its factors from the share it was served.
2. **Sum with a fixed denominator.** Every client weighs ``1 / m`` with ``m`` the configured
   clients per round (the expected count under Poisson sampling), so one client moves the sum by at
   most ``C / m`` whoever else came (add/remove neighbours; ``2C / m`` when one is replaced).
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
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from flexlora.lowrank import factored_fro_norm
from flexlora.methods.base import AggregationMethod
from flexlora.update import ClientUpdate, LoraFactors


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
    weights: list[float] | None  # None: the method's own (data-size) weights (clipping without noise)
    noise: dict[str, Tensor] | None = None  # "sum" methods: the dense term added to the sum
    record: dict[str, Any] = field(default_factory=dict)


def effective_update_norm(u: ClientUpdate) -> float:
    """``sqrt(sum_modules ||s B A||_F^2)``, exact from the factors (never the dense product when that is larger)."""
    return math.sqrt(sum(factored_fro_norm(f.scale * f.B.double(), f.A.double()) ** 2 for f in u.modules.values()))


def factor_change_norm(u: ClientUpdate, served: Mapping[str, LoraFactors]) -> float:
    """Joint Frobenius norm of ``(s (B - B_served), A - A_served)`` over every module."""
    total = 0.0
    for name, f in u.modules.items():
        total += float(torch.sum((f.scale * (f.B.double() - served[name].B.double())) ** 2))
        total += float(torch.sum((f.A.double() - served[name].A.double()) ** 2))
    return math.sqrt(total)


def _scaled(u: ClientUpdate, factor: float) -> ClientUpdate:
    """``u`` with its effective update multiplied by ``factor`` (the factor goes on B)."""
    if factor == 1.0:
        return u
    mods = {n: LoraFactors(A=f.A, B=f.B * factor, scale=f.scale) for n, f in u.modules.items()}
    return replace(u, modules=mods)


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
    shapes: Mapping[str, tuple[int, int]],
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> PrivateRound:
    """Clip every update, fix the weights, and draw the noise (None ``generator``: clipping only).

    ``served`` maps a client id to the share it started from (needed by "factors" methods)."""
    noisy = generator is not None and mech.noise_multiplier > 0
    by_factors = method.dp_release == "factors"
    out, clipped, norms = [], 0, []
    # fixed denominator: the method normalises uniform weights by the count that came, so each
    # update is pre-scaled by count / m to make every client's coefficient exactly 1 / m
    rescale = len(updates) / mech.denominator if noisy else 1.0
    for u in updates:
        norm = factor_change_norm(u, served[u.client_id]) if by_factors else effective_update_norm(u)
        factor = min(1.0, mech.clip_norm / norm) if (mech.clip_norm > 0 and norm > 0) else 1.0
        clipped += factor < 1.0
        norms.append(norm)
        factor *= rescale
        out.append(_moved(u, served[u.client_id], factor) if by_factors else _scaled(u, factor))
    record: dict[str, Any] = {"clip_norm": mech.clip_norm, "clipped": clipped, "of": len(updates)}
    if not noisy:
        return PrivateRound(out, None, None, record)
    record.update(noise_multiplier=mech.noise_multiplier, noise_std=mech.noise_std, denominator=mech.denominator)
    weights = [1.0] * len(out)
    if by_factors:
        return PrivateRound(out, weights, None, record)
    noise = {
        name: (mech.noise_std * torch.randn(shapes[name], generator=generator, dtype=torch.float64)).to(dtype)
        for name in sorted(shapes)
    }
    return PrivateRound(out, weights, noise, record)


def aggregate_private(method: AggregationMethod, private: PrivateRound, round: int, mech: Mechanism, generator: torch.Generator | None):
    """The method's aggregate of a :class:`PrivateRound`: noise inside the sum or on the factors."""
    if private.noise is not None:
        return method.aggregate(private.updates, weights=private.weights, round=round, noise=private.noise)
    state = method.aggregate(private.updates, weights=private.weights, round=round)
    if private.weights is not None and generator is not None:  # "factors" under noise
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
