"""The plain data that flows between clients and the server.

Everything here is torch tensors and Python numbers: no PEFT, no transformers, no Flower.
A LoRA module computes ``delta_W = scale * B @ A`` with ``A`` of shape (r, d_in), ``B`` of
shape (d_out, r) and ``scale = alpha / r`` (PEFT's convention; ``alpha / sqrt(r)`` for rsLoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor


class UpdateError(ValueError):
    """A client update (or a set of them) cannot be aggregated; the message names what and where."""


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA module: ``delta_W = scale * B @ A``."""

    A: Tensor  # (rank, d_in)
    B: Tensor  # (d_out, rank)
    scale: float

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise UpdateError(f"LoRA factors must be matrices, got A{tuple(self.A.shape)} B{tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise UpdateError(
                f"rank mismatch: A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise UpdateError(f"scale must be a positive finite number, got {self.scale}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    def delta(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense update ``scale * B @ A`` (for tests and small layers only)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(frozen=True)
class ModuleSpec:
    """What a client's adapter looks like at one module: its rank and its LoRA alpha."""

    rank: int
    alpha: float
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UpdateError(f"rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UpdateError(f"alpha must be a positive finite number, got {self.alpha}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


AdapterSpec = Mapping[str, ModuleSpec]
"""Per module name, the rank and alpha of one client's adapter (ranks may differ by module)."""


@dataclass
class ClientUpdate:
    """What a client uploads after local training."""

    client_id: str
    num_examples: int
    modules: dict[str, LoraFactors]
    meta: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, ModuleSpec]:
        """The client's per-module ranks (alpha recovered from the scale as alpha = scale * r)."""
        return {name: ModuleSpec(f.rank, f.scale * f.rank) for name, f in self.modules.items()}


@dataclass
class GlobalModule:
    """The server's global update for one module, ``delta_W = B @ A`` (scales folded into ``B``).

    The columns of ``B`` / rows of ``A`` are ordered by importance, so a client of rank r gets
    the first r of them (divided by its own scale). ``spectrum`` holds the singular values of
    ``delta_W`` when the method computed them.
    """

    A: Tensor  # (k, d_in)
    B: Tensor  # (d_out, k)
    spectrum: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    def delta(self, dtype: torch.dtype = torch.float64) -> Tensor:
        return self.B.to(dtype) @ self.A.to(dtype)


@dataclass
class ServerState:
    """Everything a method keeps between rounds.

    ``adapter`` is the global LoRA update that clients receive their share of. ``base_delta``,
    when set (FLoRA), is an update the clients must merge into their base weights before
    training a freshly initialised adapter; it is cumulative over rounds only in the sense
    that each round's ``base_delta`` is merged once, by everybody.
    """

    method: str
    round: int
    adapter: dict[str, GlobalModule]
    base_delta: dict[str, GlobalModule] | None = None
    weights: dict[str, float] = field(default_factory=dict)  # client id -> aggregation weight
    info: dict[str, Any] = field(default_factory=dict)


def data_size_weights(updates: list[ClientUpdate]) -> list[float]:
    """FlexLoRA's p_k = n_k / sum_j n_j."""
    sizes = [u.num_examples for u in updates]
    if any(n < 0 for n in sizes):
        raise UpdateError(f"negative number of examples in {[u.client_id for u in updates if u.num_examples < 0]}")
    total = sum(sizes)
    if total <= 0:
        raise UpdateError("all clients report 0 training examples; cannot weight by data size")
    return [n / total for n in sizes]


def normalise_weights(weights: list[float], updates: list[ClientUpdate]) -> list[float]:
    if len(weights) != len(updates):
        raise UpdateError(f"{len(weights)} weights given for {len(updates)} client updates")
    if any((not math.isfinite(w)) or w < 0 for w in weights):
        raise UpdateError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise UpdateError("weights sum to 0")
    return [w / total for w in weights]


def all_finite(t: Tensor) -> bool:
    """Fast path: a finite sum (in float64, so no overflow) means every entry is finite."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


def check_compatible(updates: list[ClientUpdate]) -> dict[str, tuple[int, int]]:
    """Check that all updates cover the same modules with the same layer shapes.

    Returns the module shapes ``{name: (d_out, d_in)}``. Raises UpdateError naming the client
    and module at the first inconsistency.
    """
    if not updates:
        raise UpdateError("no client updates to aggregate")
    first = updates[0]
    if not first.modules:
        raise UpdateError(f"client {first.client_id}: update has no modules")
    shapes = {name: (f.d_out, f.d_in) for name, f in first.modules.items()}
    for u in updates:
        names = set(u.modules)
        if names != set(shapes):
            missing = sorted(set(shapes) - names)[:3]
            extra = sorted(names - set(shapes))[:3]
            raise UpdateError(
                f"client {u.client_id}: module set differs from client {first.client_id}"
                f" (missing {missing}, extra {extra})"
            )
        for name, f in u.modules.items():
            if (f.d_out, f.d_in) != shapes[name]:
                raise UpdateError(
                    f"client {u.client_id}, module {name}: layer shape {(f.d_out, f.d_in)}"
                    f" differs from {shapes[name]} of client {first.client_id}"
                )
            for label, t in (("A", f.A), ("B", f.B)):
                if not t.is_floating_point():
                    raise UpdateError(f"client {u.client_id}, module {name}: lora_{label} has dtype {t.dtype}")
                if not all_finite(t):
                    raise UpdateError(f"client {u.client_id}, module {name}: lora_{label} contains NaN or Inf")
    return shapes
