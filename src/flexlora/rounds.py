"""The round engine: who takes part, what each client receives, and what the server does with
what comes back. The in-process simulator and the Flower server both run their rounds through
it and differ only in how an update comes back (the local trainer vs messages).

A round is planned (:meth:`RoundEngine.plan`: the sampled clients, each one's per-module ranks
and share, the bytes they download) and closed (:meth:`RoundEngine.close`: screen the updates,
let the method finish the clients' side, aggregate, merge, diagnose, the round record). Building
the federation (:func:`build_federation`) and sampling (:func:`sample_clients`) need no model:
only the target layers' shapes.
"""

from __future__ import annotations

import copy
import enum
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from flexlora.diagnostics import aggregation_report, summarise
from flexlora.fold import Loader, RoundFold, memory_stash
from flexlora.methods import AggregationMethod
from flexlora.privacy import Mechanism, aggregate_private, epsilon, noise_generator, privatize
from flexlora.seeds import derived_seed
from flexlora.resources import PAPER_DISTRIBUTIONS, PAPER_TYPES, BudgetPolicy, RankPolicy, assign_types
from flexlora.update import ClientUpdate, GlobalModule, LoraFactors, ModuleSpec, ServerState, UpdateError
from flexlora.validate import ValidationConfig

if TYPE_CHECKING:
    from flexlora.config import RunConfig
    from flexlora.data.types import ClientData


class ClientStatus(str, enum.Enum):
    """What happened to a selected client this round (a str, so records stay plain JSON)."""

    OK = "ok"
    CRASH = "crash"  # failure injection: crashed during local training
    STRAGGLE = "straggle"  # failure injection: missed the round timeout
    TIMEOUT = "timeout"  # Flower: no reply within the round timeout
    UNAVAILABLE = "unavailable"  # Flower: the node is gone (no heartbeat, or not connected)
    ERROR = "error"  # local training raised (or the node replied with an error)
    OOM = "oom"  # local training ran out of accelerator memory
    REJECTED = "rejected"  # the update failed validation (or the reply was malformed)

    def __str__(self) -> str:
        return self.value


# -- the federation ---------------------------------------------------------------------------------
@dataclass
class Federation:
    """Who trains, at which ranks: fixed for the run (types) or per round (budget)."""

    train_clients: list["ClientData"]
    eval_clients: list["ClientData"]
    shapes: dict[str, tuple[int, int]]
    types: dict[int, str]
    specs: dict[int, dict[str, ModuleSpec]]  # per client (types mode)
    notes: list[str] = field(default_factory=list)


def rank_policy(cfg: "RunConfig") -> RankPolicy:
    lora = cfg.lora
    return RankPolicy(alpha=lora.alpha, rank_scale=lora.rank_scale, cap_at_width=lora.cap_at_width, rslora=lora.rslora, groups=dict(lora.groups))


def resource_types(cfg: "RunConfig") -> dict[str, dict[str, int]]:
    return {**PAPER_TYPES, **cfg.resources.types}


def build_federation(cfg: "RunConfig", clients: Sequence["ClientData"], shapes: Mapping[str, tuple[int, int]]) -> Federation:
    """Training clients with their resource types and per-module ranks, and the fixed evaluation
    subset of held-out clients (the same for every seed and method)."""
    from flexlora.config import ConfigError

    train = [c for c in clients if not c.heldout and c.train]
    heldout = sorted((c for c in clients if c.heldout and (c.eval if cfg.eval.split == "eval" else c.test)), key=lambda c: c.client_id)
    if not train:
        raise ConfigError("the data has no training clients (every client is held out or empty)")
    assert not {c.client_id for c in train} & {c.client_id for c in heldout}
    types_def = resource_types(cfg)
    dist = cfg.resources.custom_distribution or PAPER_DISTRIBUTIONS[cfg.resources.distribution]
    types = assign_types([c.client_id for c in train], dist, seed=derived_seed(cfg.federation.seed, "types"))
    specs, notes = client_specs(cfg, {cid: types_def[t] for cid, t in types.items()}, shapes, lambda cid: "resources")
    return Federation(train, eval_subset(heldout, cfg.eval.clients), dict(shapes), types, specs, notes)


def client_specs(cfg: "RunConfig", ranks: Mapping[int, Mapping[str, int]], shapes: Mapping[str, tuple[int, int]],
                 label: Callable[[int], str]) -> tuple[dict[int, dict[str, ModuleSpec]], list[str]]:
    """Each client's per-module ranks from its resource type's ranks per module group (the config's
    types, or what a Flower node declares), and the notes on ranks capped at a layer's width;
    a rank a layer cannot hold is refused in one line that starts with ``label(client_id)``."""
    from flexlora.config import ConfigError

    policy = rank_policy(cfg)
    specs, notes = {}, set()
    for cid, group_ranks in ranks.items():
        try:
            specs[cid], n = policy.module_ranks(group_ranks, dict(shapes))
        except ValueError as e:
            raise ConfigError(f"{label(cid)}: {e}") from None
        notes.update(n)
    return specs, sorted(notes)


def eval_subset(clients: Sequence["ClientData"], count: int) -> list["ClientData"]:
    """The clients evaluated: all when there are at most ``count``, else a fixed spread-out subset
    (seed 0: the same for every run seed and method, and for ``flexlora eval``)."""
    chosen = list(clients) if len(clients) <= count else random.Random(0).sample(list(clients), count)
    return sorted(chosen, key=lambda c: c.client_id)


def clients_per_round(fed_cfg, num_clients: int) -> int:
    k = fed_cfg.clients_per_round if fed_cfg.clients_per_round is not None else max(1, math.floor(fed_cfg.fraction * num_clients + 0.5))
    return min(k, num_clients)


def sample_clients(train_clients: Sequence["ClientData"], fed_cfg, rnd: int, privacy=None) -> list["ClientData"]:
    """The clients of round ``rnd``, seeded by (seed, round): a fixed-size sample without replacement,
    or, under DP with Poisson sampling, each client independently with probability m / N (the
    sampling the privacy amplification assumes; the round's size varies and may be zero)."""
    rng = random.Random(derived_seed(fed_cfg.seed, "sample", rnd))
    m = clients_per_round(fed_cfg, len(train_clients))
    if privacy is not None and privacy.noisy and privacy.sampling == "poisson":
        q = m / len(train_clients)
        return [c for c in sorted(train_clients, key=lambda c: c.client_id) if rng.random() < q]
    return sorted(rng.sample(list(train_clients), m), key=lambda c: c.client_id)


# -- bytes ----------------------------------------------------------------------------------------------
def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def factor_bytes(factors: Iterable[LoraFactors]) -> int:
    """Bytes of LoRA factors as they travel (their own dtype)."""
    return tensor_bytes(t for f in factors for t in (f.A, f.B))


def rank_summary(spec: Mapping[str, ModuleSpec]) -> dict[str, int]:
    """The largest rank per layer kind (``q_proj``: 30, ...): a client's ranks in one line."""
    out: dict[str, int] = {}
    for name, s in spec.items():
        leaf = name.rsplit(".", 1)[-1]
        out[leaf] = max(out.get(leaf, 0), s.rank)
    return out


# -- a round ---------------------------------------------------------------------------------------------
@dataclass
class PlannedClient:
    client: "ClientData"
    spec: dict[str, ModuleSpec]
    share: dict[str, LoraFactors]
    entry: dict[str, Any]  # its line of the round record; the runner adds status and metrics

    @property
    def cid(self) -> str:
        return str(self.client.client_id)


@dataclass
class RoundPlan:
    round: int
    clients: list[PlannedClient]
    base: dict[str, Tensor]  # what every client merges into its base weights first (cumulative; empty unless the method merges)
    bytes_down: int
    started: float = field(default_factory=time.perf_counter)

    @property
    def specs(self) -> dict[str, dict[str, ModuleSpec]]:
        return {p.cid: p.spec for p in self.clients}


@dataclass
class RoundOutcome:
    """What came back: accepted-for-screening updates in client-id order (or, from a runner that
    folded them as they came, the :class:`~flexlora.fold.RoundFold` from :meth:`RoundEngine.open_fold`),
    each selected client's record line (status set), and the reasons for the clients left out."""

    updates: list[ClientUpdate]
    entries: list[dict[str, Any]]
    dropped: dict[str, list[str]]
    bytes_up: int
    train_seconds: float
    fold: RoundFold | None = None


@dataclass
class RoundRecord:
    """What happened in one round: one line of ``metrics.jsonl`` (the runners add evaluation,
    timings of their own and, on Flower, the nodes' traffic to its plain-data form)."""

    round: int
    clients: list[dict[str, Any]]  # one line per selected client: id, type, n, ranks, status (ClientStatus), metrics
    dropped: dict[str, list[str]]  # client id -> why it was left out
    bytes_up: int
    bytes_down: int
    timings: dict[str, float]
    skipped: str | None = None  # why the global state stayed as it was (too few valid updates)
    aggregation: dict[str, Any] | None = None  # diagnostics summary (None when skipped)
    train_loss: float | None = None
    tokens: int = 0
    privacy: dict[str, Any] | None = None  # clipping, noise and epsilon spent so far (flexlora.privacy)
    stage: str | None = None  # a stage's rounds (SLoRA's sparse warm-up: "slora-sparse"); None: LoRA rounds

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"round": self.round, "clients": self.clients, "dropped": self.dropped, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}
        if self.stage is not None:
            d["stage"] = self.stage
        if self.skipped is not None:
            d["skipped"] = self.skipped
        else:
            d.update(train_loss=self.train_loss, tokens=self.tokens)
            if self.aggregation is not None:  # a stage without the method's aggregation has no diagnostics
                d["aggregation"] = self.aggregation
        if self.privacy is not None:
            d["privacy"] = self.privacy
        d["timings"] = dict(self.timings)
        return d


class RoundEngine:
    """Plans and closes rounds for one run; holds the server-side state that is not the method's
    (clients' persistent state, the update merged into the base weights)."""

    def __init__(self, cfg: "RunConfig", federation: Federation, method: AggregationMethod, server_dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.fed = federation
        self.method = method
        self.server_dtype = server_dtype
        self.merged: dict[str, Tensor] = {}  # cumulative update merged into the base weights (FLoRA, SLoRA stage 1)
        self.client_state: dict[str, Any] = {}

    # -- who and what -------------------------------------------------------------------------------
    def set_federation(self, federation: Federation) -> None:
        """Replace who trains (the Flower server: the nodes that answered, at the ranks they declared)."""
        self.fed = federation
        if self.cfg.resources.mode == "types":
            self.method.check_specs(list(federation.specs.values()), labels=[f"client {cid}" for cid in federation.specs])

    def sample(self, rnd: int) -> list["ClientData"]:
        return sample_clients(self.fed.train_clients, self.cfg.federation, rnd, self.cfg.privacy)

    def spec_for(self, client: "ClientData", rnd: int, budget_mib: float | None = None) -> dict[str, ModuleSpec]:
        """The client's per-module ranks this round; ``budget_mib`` overrides the configured budget
        (budget mode: a Flower node declares its own)."""
        if self.cfg.resources.mode == "types":
            return self._pruned(client.client_id, self.fed.specs[client.client_id])
        r = self.cfg.resources
        policy = BudgetPolicy(ranks=tuple(r.budget_ranks), fluctuation=r.budget_fluctuation)
        budget = r.budget_mib[client.client_id % len(r.budget_mib)] if budget_mib is None else budget_mib
        rank = policy.rank_for(budget, self.fed.shapes, client.client_id, rnd, self.cfg.federation.seed)
        spec = {n: ModuleSpec(rank=min(rank, min(s)), alpha=self.cfg.lora.alpha, rslora=self.cfg.lora.rslora) for n, s in self.fed.shapes.items()}
        return self._pruned(client.client_id, spec)

    def _pruned(self, client_id: int | str, spec: dict[str, ModuleSpec]) -> dict[str, ModuleSpec]:
        return dict(self.method.cap_spec(spec, client_id, self.client_state))

    def plan(self, rnd: int, state: ServerState, budgets: Mapping[int, float | None] | None = None, shares: bool = True) -> RoundPlan:
        """The round's clients, each with its ranks and its share of ``state``, and the bytes they
        download; ``shares=False``: no shares (a stage that trains no LoRA counts its own bytes)."""
        started = time.perf_counter()
        base = dict(self.merged)
        base_bytes = tensor_bytes(base.values())
        planned, bytes_down = [], 0
        for client in self.sample(rnd):
            spec = self.spec_for(client, rnd, budget_mib=(budgets or {}).get(client.client_id))
            share = self.method.share_for(state, spec) if shares else {}
            bytes_down += factor_bytes(share.values()) + base_bytes
            entry = {"id": client.client_id, "type": self.fed.types.get(client.client_id), "n": client.num_examples, "ranks": rank_summary(spec)}
            planned.append(PlannedClient(client, spec, share, entry))
        return RoundPlan(rnd, planned, base, bytes_down, started)

    def too_few(self, accepted: int) -> str:
        """Why a round with ``accepted`` good updates keeps the global state (fewer than ``min_clients``)."""
        return f"only {accepted} valid updates, fewer than min_clients={self.cfg.federation.min_clients}; global state unchanged"

    def min_updates(self) -> int:
        return max(1, self.cfg.federation.min_clients)

    def train_seed(self, rnd: int, client_id: int) -> int:
        return derived_seed(self.cfg.federation.seed, "train", rnd, client_id)

    # -- the server's half ---------------------------------------------------------------------------
    def close(self, plan: RoundPlan, state: ServerState, outcome: RoundOutcome) -> tuple[RoundRecord, ServerState]:
        """Screen the updates, let the method finish the clients' side, aggregate, merge, diagnose.

        Returns the round's record and the new state (the old one when fewer than ``min_clients``
        updates pass validation)."""
        cfg = self.cfg
        t_start = time.perf_counter()
        fold = outcome.fold if outcome.fold is not None else self.fold_updates(plan, outcome.updates)
        specs = fold.specs
        accepted_ids, rejected = fold.settle()  # the screen's verdict
        dropped = {**outcome.dropped, **rejected}
        entries = outcome.entries
        for e in entries:
            if str(e["id"]) in rejected:
                e["status"] = ClientStatus.REJECTED
        rec = RoundRecord(plan.round, entries, dropped, outcome.bytes_up, plan.bytes_down, timings={"train": outcome.train_seconds, "aggregate": 0.0})
        rec.privacy = self.privacy_spent(plan.round)
        terms: list[ClientUpdate] = []  # what the state is the weighted sum of (under DP: the clipped changes and the previous update)

        def aggregate() -> ServerState:
            nonlocal terms
            if fold.streaming:  # folded as they came: the method's client-side step ran on each, its notes are kept now
                self.client_state = fold.client_state
                self._apply_notes(fold.notes, specs, entries)
                return fold.aggregate(plan.round)
            terms = self._after_local_training(fold.accepted_updates, specs, entries)
            if not cfg.privacy.clips:
                return self.method.aggregate(terms, round=plan.round)
            terms, private_state, dp_record = self._aggregate_private(plan, state, terms)
            rec.privacy = {**dp_record, **(rec.privacy or {})}
            return private_state

        def diagnose(new_state: ServerState) -> dict[str, dict]:
            share_ranks = {n: sorted({specs[cid][n].rank for cid in accepted_ids}) for n in self.fed.shapes}  # after pruning
            if fold.streaming:
                return fold.report(new_state, share_ranks)
            weights = [new_state.weights[u.client_id] for u in terms]
            return aggregation_report(new_state, terms, weights, share_ranks, exact=self.method.exact_aggregate)

        closing = close_step((accepted_ids, rejected), self.min_updates(), aggregate, self.too_few, self.method.name, diagnose)
        if closing.state is None:
            rec.skipped = closing.skipped
            return rec, state
        new_state = closing.state
        if new_state.base_delta is not None:  # the method merges its update into everybody's base weights
            device = self.method.device  # the dense products run where federation.server_device says; merged stays on the CPU
            for name, gm in new_state.base_delta.items():
                d = (gm.B.to(device, self.server_dtype) @ gm.A.to(device, self.server_dtype)).cpu()
                self.merged[name] = self.merged[name] + d if name in self.merged else d
        rec.aggregation = {**summarise(closing.report), "per_layer_type": per_layer_type(closing.report)}
        ok = [e for e in entries if e.get("status") == ClientStatus.OK]
        rec.train_loss = mean([e["loss_mean"] for e in ok])
        rec.tokens = sum(e.get("tokens", 0) for e in ok)
        rec.timings = {"train": outcome.train_seconds, "aggregate": time.perf_counter() - t_start - closing.seconds["diagnostics"],
                       "diagnostics": closing.seconds["diagnostics"]}
        return rec, new_state

    def open_fold(self, plan: RoundPlan, stash: Callable[[ClientUpdate], Loader] = memory_stash) -> RoundFold:
        """The round's :class:`~flexlora.fold.RoundFold`: a runner adds each update as it comes (and
        marks a client that sends nothing ``absent``), in the order of the plan, then passes it to
        :meth:`close` in ``RoundOutcome.fold``. The method's client-side step after training runs on
        each update as it is folded, on a copy of the clients' state that :meth:`close` keeps only when
        the round is aggregated. Under [privacy] clipping every update is held (the clipped sum needs
        every client's served share and the count) and the round closes as before."""
        cfg = self.cfg
        # under clipping, the bound replaces the norm screen (which would let clients decide each other's fate)
        norm_factor = None if cfg.privacy.clips else cfg.failures.norm_factor
        shadow = copy.deepcopy(self.client_state)
        notes: dict[str, dict[str, Any]] = {}

        def prepare(update: ClientUpdate) -> ClientUpdate:
            out, note = self.method.after_local_training([update], shadow, cfg.train)
            if len(out) != 1:
                raise RuntimeError(f"{self.method.name}: after_local_training must return one update per update")
            notes.update(note)
            return out[0]

        fold = RoundFold(self.method, self.fed.shapes, ValidationConfig(norm_factor=norm_factor), [p.cid for p in plan.clients],
                         plan.specs, prepare, stash, hold_all=cfg.privacy.clips)
        fold.client_state, fold.notes = shadow, notes
        return fold

    def fold_updates(self, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> RoundFold:
        """A fold of updates that came all at once, added in the order of the plan as a runner that
        folds them as they come adds them (so both fold the same bits)."""
        fold = self.open_fold(plan)
        by_id = {u.client_id: u for u in updates}
        for p in plan.clients:
            u = by_id.pop(p.cid, None)
            if u is None:
                fold.absent(p.cid)
            else:
                fold.add(u)
        for u in by_id.values():  # not in the plan: the screen rejects it (no declared ranks) or takes it
            fold.add(u)
        return fold

    # -- what a checkpoint must keep ------------------------------------------------------------------
    def servable_ranks(self) -> dict[str, int]:
        """Per module, the largest rank any client of this federation can be served."""
        shapes = self.fed.shapes
        if self.cfg.resources.mode == "types":
            ranks = {n: 0 for n in shapes}
            for spec in self.fed.specs.values():
                for n, s in spec.items():
                    ranks[n] = max(ranks[n], s.rank)
            return ranks
        top = max(self.cfg.resources.budget_ranks)
        return {n: min(top, min(shape)) for n, shape in shapes.items()}

    def checkpoint_state(self, state: ServerState, last_round: bool) -> ServerState:
        """The state a checkpoint between rounds needs: the triplets some client can be served.

        Resuming needs the state only to hand out shares (the round's evaluation is done before its
        checkpoint), and a share of rank r reads the first r columns, so the rest is not stored: a
        FlexLoRA state (full rank: (d_out + d_in) min(d_out, d_in) numbers, more than the dense
        update) shrinks to (d_out + d_in) r_max. Kept whole: the last round's (``final/`` is written
        from it), under [privacy] (the next update is added to the whole previous one), and for
        a method whose share reads more than the leading ranks (``share_reads_leading_ranks``)."""
        if last_round or self.cfg.privacy.clips or not self.method.share_reads_leading_ranks:
            return state
        caps = self.servable_ranks()
        adapter, cut = {}, {}
        for name, gm in state.adapter.items():
            k = caps.get(name, gm.rank)
            if gm.rank > k > 0:  # clone: torch.save of a view would store the whole tensor
                adapter[name] = GlobalModule(A=gm.A[:k].clone(), B=gm.B[:, :k].clone(), spectrum=gm.spectrum)
                cut[name] = k
            else:
                adapter[name] = gm
        if not cut:
            return state
        return replace(state, adapter=adapter, info={**state.info, "stored_ranks": "servable"})

    def privacy_spent(self, rnd: int) -> dict[str, Any] | None:
        """epsilon at delta after ``rnd`` rounds (every round counts, also one with no valid update)."""
        pv = self.cfg.privacy
        if not pv.noisy:
            return None
        n = len(self.fed.train_clients)
        m = clients_per_round(self.cfg.federation, n)
        eps = epsilon(pv.noise_multiplier, rnd, pv.delta, pv.sampling, n, m)
        return {"epsilon": eps, "delta": pv.delta, "sampling": pv.sampling}

    def _aggregate_private(self, plan: RoundPlan, state: ServerState, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], ServerState, dict[str, Any]]:
        """Clip, weigh 1/m, noise (flexlora.privacy); returns the terms of the sum for the diagnostics."""
        pv = self.cfg.privacy
        m = clients_per_round(self.cfg.federation, len(self.fed.train_clients))
        mech = Mechanism(clip_norm=pv.clip_norm, noise_multiplier=pv.noise_multiplier, denominator=m)
        generator = noise_generator(derived_seed(self.cfg.federation.seed, "dp-noise", plan.round)) if pv.noisy else None
        served = {p.cid: p.share for p in plan.clients}
        previous = None if self.method.restarts_adapter else state.adapter  # a restarting method merged it into the base
        private = privatize(updates, self.method, mech, served, previous, self.fed.shapes, generator, self.server_dtype)
        state = aggregate_private(self.method, private, plan.round, mech, generator)
        return private.updates, state, private.record

    def _after_local_training(self, updates: list[ClientUpdate], specs: dict[str, dict[str, ModuleSpec]], entries: list[dict[str, Any]]) -> list[ClientUpdate]:
        """The method's client-side step after training (HetLoRA: rank self-pruning). It depends only on a
        client's own update and state, so running it here gives what the client would have sent."""
        updates, notes = self.method.after_local_training(updates, self.client_state, self.cfg.train)
        self._apply_notes(notes, specs, entries)
        return updates

    @staticmethod
    def _apply_notes(notes: Mapping[str, dict[str, Any]], specs: dict[str, dict[str, ModuleSpec]], entries: list[dict[str, Any]]) -> None:
        """The method's notes after training into the clients' record lines; pruned ranks into ``specs``."""
        log = {str(e["id"]): e for e in entries}
        for cid, note in notes.items():
            entry = log.get(cid, {})
            pruned = note.get("pruned_ranks")
            entry.update({k: v for k, v in note.items() if k != "pruned_ranks"})
            if pruned:
                specs[cid] = {n: replace(s, rank=pruned.get(n, s.rank)) for n, s in specs[cid].items()}
                entry["pruned_to"] = rank_summary(specs[cid])


# -- the server's close step ------------------------------------------------------------------------------
@dataclass
class Closing:
    """What the close step decided: the accepted and rejected clients, and the new state, or why
    there is none (the previous state is kept)."""

    accepted: list[str]
    rejected: dict[str, list[str]]
    state: Any  # what ``aggregate`` made (a ServerState; SLoRA's stage: its dense mean), None when skipped
    skipped: str | None = None
    report: dict[str, dict] | None = None  # the diagnostics (flexlora.diagnostics.aggregation_report)
    seconds: dict[str, float] = field(default_factory=dict)  # aggregate, diagnostics


def close_step(verdict: tuple[list[str], dict[str, list[str]]], minimum: int, aggregate: Callable[[], Any], too_few: Callable[[int], str],
               name: str, diagnose: Callable[[Any], dict[str, dict]] | None = None) -> Closing:
    """The server's close step, for every place that aggregates (the round engine, the Strategy,
    SLoRA's stage, ``flexlora aggregate``): the screen's ``verdict`` (accepted ids, rejected ids with
    reasons) -> enough good updates? -> ``aggregate`` -> ``diagnose`` the new state. ``too_few(n)``
    words a round with fewer than ``minimum`` accepted updates; an aggregate that method ``name``
    refuses (``UpdateError``) keeps the previous state too."""
    accepted, rejected = verdict
    if len(accepted) < minimum:
        return Closing(accepted, rejected, None, too_few(len(accepted)))
    t0 = time.perf_counter()
    try:
        state = aggregate()
    except UpdateError as e:
        return Closing(accepted, rejected, None, f"{name} cannot aggregate these updates: {e}")
    t1 = time.perf_counter()
    report = diagnose(state) if diagnose is not None else None
    return Closing(accepted, rejected, state, report=report, seconds={"aggregate": t1 - t0, "diagnostics": time.perf_counter() - t1})


# -- small helpers of the record ------------------------------------------------------------------------
def per_layer_type(report: dict[str, dict]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict]] = {}
    for name, e in report.items():
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(e)
    return {
        leaf: {
            "effective_rank": mean([e.get("effective_rank", 0.0) for e in es]),
            "rank_90": mean([e.get("rank_90", 0) for e in es]),
            "rel_error_vs_exact": mean([e.get("rel_error_vs_exact", 0.0) for e in es]),
        }
        for leaf, es in groups.items()
    }


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def metrics_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A client's training metrics as they go into its record line (floats rounded to 6 digits)."""
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
