"""The one interface every aggregation method implements, and the helpers they share.

A method turns one round's client updates into a :class:`ServerState` (``aggregate``) and hands a
client of given per-module ranks its share of that state (``share_for``). The default
``share_for`` takes the first r columns of the global ``B`` (divided by the client's own scale)
and the first r rows of ``A``: for SVD-ordered states that is the best rank-r approximation,
for zero-padded states it is HetLoRA's truncation. A method overrides only what differs.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from flexlora.lowrank import LowRankSum, map_modules
from flexlora.seeds import module_seed
from flexlora.update import (
    AdapterSpec,
    ClientUpdate,
    GlobalModule,
    LoraFactors,
    ServerState,
    UpdateError,
    check_compatible,
    data_size_weights,
    normalise_weights,
)


class LocalPenalty(NamedTuple):
    """An extra term of the local loss: ``weight * term(pairs)`` over the client's (A, B) pairs."""

    weight: float
    term: Callable[[Sequence[tuple[Tensor, Tensor]]], Tensor]


class AggregationMethod(ABC):
    """Aggregate heterogeneous-rank LoRA updates; share the result back at each client's ranks.

    The server side is :meth:`aggregate` and :meth:`share_for`. The client side is a set of hooks
    with neutral defaults, so a runner never asks which method it runs: :meth:`trained_factors` and
    :meth:`local_training` (which factors local training trains in a round, and its other settings),
    :meth:`local_penalty` (an extra loss term), :meth:`after_local_training` (e.g. rank self-pruning) and :meth:`cap_spec` (ranks a client's
    persistent state allows). A method that merges its update into the base weights returns a state
    with ``base_delta`` set. Every setting only this method reads, server or client side, is a
    constructor option (``federation.method_options``: typed and range-checked by the constructor);
    ``former_train_keys`` maps the ``train.*`` keys older versions had for them to those options.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    supports_heterogeneous_ranks: ClassVar[bool] = True
    former_train_keys: ClassVar[Mapping[str, str]] = {}  # an older version's train.<key> -> this method's option
    # A share of rank r reads only the state's first r columns of B and rows of A (the default
    # share_for), so a checkpoint between rounds may keep just the ranks some client can be served.
    # A method whose share_for reads more of its state sets this False (a subclass that overrides
    # share_for without saying gets False).
    share_reads_leading_ranks: ClassVar[bool] = True
    merges_into_base: ClassVar[bool] = False  # its state carries base_delta: every client merges it into its base weights
    restarts_adapter: ClassVar[bool] = False  # every client restarts LoRA from a fresh init each round (FLoRA, FLoRIST)
    # Central DP (flexlora.privacy): "sum" when the state is computed from the exact weighted sum alone
    # (``aggregate(..., noise=...)`` adds a dense term to it), "factors" when the averaged factors are the
    # release (noise goes on them), None when neither holds (``dp_note`` says why).
    dp_release: ClassVar[str | None] = None
    dp_note: ClassVar[str] = "its aggregate is not a function of one noised sum or of averaged factors"
    dp_noised_factors: ClassVar[tuple[str, ...]] = ("B", "A")  # for "factors": the factors that carry client data
    # What ``flexlora aggregate`` writes into each input's folder (``share_for`` at the input's own ranks),
    # said after every aggregation and kept in report.json: a user follows it literally, so each method
    # states its own. ``base_update`` is the folder of what every client merges into its base weights.
    shares_text: ClassVar[str] = (
        "each input's share of the global update at its own ranks: the adapter that input's client continues from"
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "share_for" in cls.__dict__ and "share_reads_leading_ranks" not in cls.__dict__:
            cls.share_reads_leading_ranks = False

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype  # the dtype the server computes in
        self.seed = seed  # seeds the random rows given to ranks the state does not fill
        self.device = torch.device(device)  # where the server computes; the state it returns is on the CPU

    @property
    def uses_weights(self) -> bool:
        """Whether ``aggregate(weights=...)`` changes the result (HetLoRA's norm weighting ignores them)."""
        return True

    @property
    def exact_aggregate(self) -> bool:
        """True when the global update equals ``sum_k p_k s_k B_k A_k`` by construction (property-
        tested); diagnostics then estimate the distance to it instead of computing it exactly."""
        return False

    # -- the interface ---------------------------------------------------------------------------
    def accumulator(self) -> "Accumulator":
        """A fold of one round's updates as they arrive (:class:`Accumulator`): the method's
        :meth:`streaming_accumulator` when the class that defines it also defines :meth:`aggregate`
        (a subclass that changes ``aggregate`` but not the fold is never folded by its parent's
        rule), else :class:`HeldUpdates`, which holds every update and calls :meth:`aggregate`."""
        if self._own_fold():
            acc = self.streaming_accumulator()
            if acc is not None:
                return acc
        return HeldUpdates(self)

    def streaming_accumulator(self) -> "Accumulator | None":
        """Opt-in: a method whose aggregate is a running sum returns an accumulator that folds each
        update as it arrives, so the server keeps about one dense update instead of every client's
        factors. None (the default): the updates are held and :meth:`aggregate` runs at the end."""
        return None

    @property
    def folds_updates(self) -> bool:
        """Whether :meth:`accumulator` folds updates as they arrive (False: it holds them all)."""
        return not isinstance(self.accumulator(), HeldUpdates)

    def _own_fold(self) -> bool:
        """The class that defines ``streaming_accumulator`` is (a subclass of) the one that defines ``aggregate``."""
        mro = type(self).__mro__
        owner = lambda attr: next(c for c in mro if attr in c.__dict__)  # noqa: E731
        fold_owner = owner("streaming_accumulator")
        return fold_owner is not AggregationMethod and issubclass(fold_owner, owner("aggregate"))

    @abstractmethod
    def aggregate(
        self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None, round: int = 0
    ) -> ServerState:
        """Combine one round's updates. ``weights`` default to data sizes (n_k / sum n_j)."""

    def share_for(self, state: ServerState, spec: AdapterSpec) -> dict[str, LoraFactors]:
        """The adapter a client with per-module ``spec`` starts its next round from."""
        missing = sorted(set(spec) - set(state.adapter))
        if missing:
            raise UpdateError(f"the server state has no module {missing[0]!r} (and {len(missing) - 1} more)")
        return {name: self._share_module(state, name, state.adapter[name], s.rank, s.scale) for name, s in spec.items()}

    def check_specs(self, specs: Sequence[AdapterSpec], labels: Sequence[str] | None = None) -> None:
        """Refuse a federation this method cannot serve, before any training happens. ``labels``
        name the clients in the message (input folders, client ids); default ``client <index>``."""
        if self.supports_heterogeneous_ranks or not specs:
            return
        names = list(labels) if labels is not None else [f"client {i}" for i in range(len(specs))]
        first = specs[0]
        for i, spec in enumerate(specs):
            for name, s in spec.items():
                if name in first and s.rank != first[name].rank:
                    raise UpdateError(
                        f"{self.name} needs every client at the same rank per module, but module {name!r} has rank "
                        f"{first[name].rank} for {names[0]} and {s.rank} for {names[i]}; use flexlora, hetlora, "
                        f"rank_partition or rolora for heterogeneous ranks"
                    )

    def initial_state(self, shapes: Mapping[str, tuple[int, int]], round: int = 0) -> ServerState:
        """The state before round 1: no update yet, so every share is a fresh LoRA init (B = 0)."""
        empty = {
            name: GlobalModule(A=torch.zeros(0, d_in, dtype=self.dtype), B=torch.zeros(d_out, 0, dtype=self.dtype))
            for name, (d_out, d_in) in shapes.items()
        }
        return ServerState(method=self.name, round=round, adapter=empty, info={"seed": self.seed})

    def add_factor_noise(self, state: ServerState, std: float, generator: torch.Generator, factors: Sequence[str] | None = None) -> ServerState:
        """DP for a "factors" method: Gaussian noise of ``std`` on every entry of the released factors
        (``factors``, default ``dp_noised_factors``; ``B`` holds the effective ``s * B``). Noise is drawn
        on the CPU so it does not depend on the device."""
        for name in sorted(state.adapter):
            gm = state.adapter[name]
            noisy = {f: getattr(gm, f) for f in ("A", "B")}
            for f in self.dp_noised_factors if factors is None else factors:
                t = noisy[f]
                noisy[f] = t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)
            state.adapter[name] = GlobalModule(A=noisy["A"], B=noisy["B"], spectrum=gm.spectrum)
        return state

    # -- the client side -----------------------------------------------------------------------------
    def trained_factors(self, round: int) -> tuple[str, ...]:
        """The LoRA factors clients train in ``round`` (1-based); the others stay as their share gave
        them. Runners pass it on to clients that train themselves (the Strategy's ``"trained-factors"``)."""
        return ("A", "B")

    def local_training(self, train: Any, round: int = 1) -> Any:
        """The local-training settings (a ``TrainConfig``) this method needs in ``round``: a factor
        :meth:`trained_factors` leaves out is frozen. Runners call it every round (before a client trains)."""
        factors = self.trained_factors(round)  # a factor the user froze (train.freeze_A / freeze_B) stays frozen
        freeze_A, freeze_B = train.freeze_A or "A" not in factors, train.freeze_B or "B" not in factors
        if (freeze_A, freeze_B) == (train.freeze_A, train.freeze_B):
            return train
        return dataclasses.replace(train, freeze_A=freeze_A, freeze_B=freeze_B)

    def local_penalty(self, train: Any) -> LocalPenalty | None:
        """An extra loss term added at every local step, or None."""
        return None

    def after_local_training(
        self, updates: Sequence[ClientUpdate], client_state: dict[str, Any], train: Any
    ) -> tuple[list[ClientUpdate], dict[str, dict[str, Any]]]:
        """Turn the clients' accepted updates into what they send (e.g. after rank self-pruning);
        ``client_state`` persists across rounds and checkpoints. Returns the updates and, per
        client id, notes for its line of the round record."""
        return list(updates), {}

    def cap_spec(self, spec: AdapterSpec, client_id: int | str, client_state: Mapping[str, Any]) -> AdapterSpec:
        """The ranks a client trains at, given its persistent state; the default is its declared spec."""
        return spec

    # -- helpers shared by the methods -------------------------------------------------------------
    def _prepare(
        self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None
    ) -> tuple[list[ClientUpdate], list[float]]:
        updates = list(updates)
        check_compatible(updates)
        p = data_size_weights(updates) if weights is None else normalise_weights(list(weights), updates)
        return updates, p

    def round_state(self, round: int, adapter: dict[str, GlobalModule], updates: Sequence[ClientUpdate | str], p: Sequence[float], **info) -> ServerState:
        """The state of a round, as ``aggregate`` and the method's accumulator return it; ``updates``
        (or their client ids) name the weights ``p``."""
        return ServerState(
            method=self.name,
            round=round,
            adapter=modules_on_cpu(adapter),
            weights={(u if isinstance(u, str) else u.client_id): float(w) for u, w in zip(updates, p)},
            info={"seed": self.seed, **info},
        )

    def _share_module(self, state: ServerState, name: str, gm: GlobalModule, rank: int, scale: float) -> LoraFactors:
        k = min(rank, gm.rank)
        B = gm.B[:, :k] / scale
        A = gm.A[:k]
        if k < rank:
            B, A = _pad_with_fresh_rows(B, A, rank, _module_seed(state, name))
        return LoraFactors(A=A.contiguous(), B=B.contiguous(), scale=scale)


class Accumulator(ABC):
    """One round's aggregation, fed one update at a time: ``add`` every accepted update (in a fixed
    order: the result may depend on it at rounding level), then ``finish`` once. ``weight`` is the
    update's unnormalised weight (default its number of examples); the weights are normalised at the
    end, so nothing needs to be known before the first update comes. ``finish`` returns what
    ``aggregate(updates, weights)`` returns for the same updates: the same bits where the method's
    arithmetic order allows, else the same to rounding (each method says which)."""

    def __init__(self, method: "AggregationMethod") -> None:
        self.method = method
        self.client_ids: list[str] = []
        self.weights: list[float] = []
        self.explicit = False  # some weight was given (else the data sizes, as aggregate's default)
        self.skeleton: ClientUpdate | None = None  # the first update's module names and shapes (no factors)

    def add(self, update: ClientUpdate, weight: float | None = None) -> None:
        if weight is not None:
            if not (math.isfinite(weight) and weight >= 0):
                raise UpdateError(f"client {update.client_id}: weight must be finite and >= 0, got {weight}")
            self.explicit = True
        elif update.num_examples < 0:
            raise UpdateError(f"negative number of examples in {[update.client_id]}")
        w = float(update.num_examples) if weight is None else float(weight)
        self.check(update)
        self.fold(update, w)  # first: a refused update leaves no trace
        self.client_ids.append(update.client_id)
        self.weights.append(w)

    @abstractmethod
    def fold(self, update: ClientUpdate, weight: float) -> None:
        """Add one update with its unnormalised weight."""

    @abstractmethod
    def finish(self, round: int = 0) -> ServerState:
        """The state of the round (call once)."""

    def normalised(self) -> list[float]:
        """p_k as ``aggregate`` computes them: ``n_k / sum n`` (data sizes) or ``w_k / sum w``."""
        if not self.client_ids:
            raise UpdateError("no client updates to aggregate")
        total = sum(self.weights)
        if total <= 0:
            raise UpdateError("weights sum to 0" if self.explicit else "all clients report 0 training examples; cannot weight by data size")
        if self.explicit:
            return [w / total for w in self.weights]
        sizes = [int(w) for w in self.weights]
        return [n / sum(sizes) for n in sizes]

    def check(self, update: ClientUpdate) -> None:
        """The checks ``aggregate`` makes across updates (same modules, same layer shapes, finite
        floats), against the first update's shapes (its factors are not kept)."""
        if self.skeleton is None:
            check_compatible([update])
            self.skeleton = ClientUpdate(update.client_id, 0, {n: LoraFactors(A=f.A.new_empty(0, f.d_in), B=f.B.new_empty(f.d_out, 0), scale=1.0) for n, f in update.modules.items()})
        else:
            check_compatible([self.skeleton, update])


class ModuleSums(Accumulator):
    """A running :class:`~flexlora.lowrank.LowRankSum` per module (the clients' factors while the
    stacked rank is small, the dense sum beyond), for the methods whose round is one SVD of a
    weighted sum (FlexLoRA, FLoRIST); ``add_module`` says how one client's module enters the sum."""

    def __init__(self, method: "AggregationMethod") -> None:
        super().__init__(method)
        self.sums: dict[str, LowRankSum] = {}

    @abstractmethod
    def add_module(self, update: ClientUpdate, name: str, weight: float) -> None:
        """Add module ``name`` of ``update`` to ``self.sums[name]`` with its unnormalised weight."""

    def fold(self, update: ClientUpdate, weight: float) -> None:
        m = self.method
        for name, f in update.modules.items():
            if name not in self.sums:
                self.sums[name] = LowRankSum(f.d_out, f.d_in, m.dtype, m.device, m.svd_path)
        # one thread per module: the bits do not depend on the thread count
        map_modules(lambda name: self.add_module(update, name, weight), list(update.modules), m.device)


class HeldUpdates(Accumulator):
    """The default: hold every update, call the method's ``aggregate`` at the end (the same bits)."""

    def __init__(self, method: "AggregationMethod") -> None:
        super().__init__(method)
        self.updates: list[ClientUpdate] = []

    def fold(self, update: ClientUpdate, weight: float) -> None:
        self.updates.append(update)

    def finish(self, round: int = 0) -> ServerState:
        return self.method.aggregate(self.updates, weights=self.weights if self.explicit else None, round=round)


def modules_on_cpu(modules: Mapping[str, GlobalModule]) -> dict[str, GlobalModule]:
    """Server state lives on the CPU whatever device computed it, so a run moves between devices."""
    def cpu(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.cpu()

    return {n: GlobalModule(A=cpu(gm.A), B=cpu(gm.B), spectrum=cpu(gm.spectrum)) for n, gm in modules.items()}


def _module_seed(state: ServerState, name: str) -> int:
    return module_seed(int(state.info.get("seed", 0)), state.round, name)


def fresh_lora_rows(rank: int, d_in: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Rows of a fresh LoRA ``A`` as PEFT initialises it (kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))).

    Row i is the same for every requested ``rank > i`` (prefix-consistent), so clients of
    different ranks share the leading rows.
    """
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def _pad_with_fresh_rows(B: Tensor, A: Tensor, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Grow a rank-k pair to ``rank`` without changing ``B @ A``: zero columns in B, fresh rows in A.

    Zero rows in A as well would give both padded factors zero gradient forever; fresh rows
    keep the extra rank trainable, exactly as a new LoRA adapter is initialised.
    """
    k = A.shape[0]
    extra_A = fresh_lora_rows(rank, A.shape[1], seed, A.dtype)[k:]
    extra_B = torch.zeros(B.shape[0], rank - k, dtype=B.dtype)
    return torch.cat([B, extra_B], dim=1), torch.cat([A, extra_A], dim=0)


def zero_pad(t: Tensor, rank: int, dim: int) -> Tensor:
    """Zero-pad the rank dimension of a factor to ``rank`` (HetLoRA's padding)."""
    missing = rank - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def scaled_factors(u: ClientUpdate, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(scale * B, A) of one module in the server's dtype and on its device: the effective update, scale applied first."""
    f = u.modules[name]
    return f.scale * f.B.to(device, dtype), f.A.to(device, dtype)
