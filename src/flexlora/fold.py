"""One round's updates screened and folded as they arrive, so the server holds about one dense
update (plus one client's factors) however many clients reply.

Both runners close a round through :class:`RoundFold`: the round engine (the simulator, which adds
each update as soon as its client has trained, and our Flower ServerApp) and the Strategy (which adds
each reply as it parses it). Every update is checked on arrival (:func:`flexlora.validate.validate_update`)
and, when the method folds (:meth:`AggregationMethod.accumulator`), added to the method's running
sums and to the diagnostics' reference (:class:`flexlora.diagnostics.ExactReference`); otherwise it is
held and the method's ``aggregate`` runs at the end, exactly as before.

The median norm screen (``ValidationConfig.norm_factor``) needs every client's norm, so an update
that the screen could still reject is not folded: an update folded and later rejected could not be
taken out again exactly (an absurd norm, the case the screen is for, leaves nothing of the others
after a subtraction). Only the norms are kept; an update is folded as soon as its norm is at most
``norm_factor`` times the lowest median the round can still reach (every client still expected
replying with a zero norm), else held until that bound (which only rises) admits it or the round
ends. The screen then decides from the same norms exactly as :func:`flexlora.validate.screen_updates`
does, so the same updates are dropped. A held update costs the server nothing where it can be read
again (``add(update, reload=...)``: the Strategy re-parses the reply Flower still holds); otherwise
it is kept by the ``stash``: in memory (the default) or on disk (:class:`DiskStash`). In an ordinary
round the first half of the clients is held (the bound is zero until more than half have replied),
then everything folds on arrival.

Updates fold in order of arrival except that a held one folds when it is admitted, after the
updates that came meanwhile and were admitted on arrival. That order is decided only by the sequence
of ``add`` / ``absent`` calls, so two runners that make the same calls fold the same bits (both
runners call them in the order of the round's plan).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from flexlora.diagnostics import ExactReference, aggregation_report
from flexlora.methods.base import AggregationMethod, HeldUpdates
from flexlora.update import AdapterSpec, ClientUpdate, LoraFactors, ServerState
from flexlora.validate import ValidationConfig, norm_verdicts, screen_updates, screening_norm, validate_update

Loader = Callable[[], ClientUpdate]


def memory_stash(update: ClientUpdate) -> Loader:
    """Hold an update in memory."""
    return lambda: update


class DiskStash:
    """Hold updates in a private temporary folder (``torch.save`` of the factors), read back once;
    the folder is removed by :meth:`close` (RoundFold calls it when the round is settled)."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.parent = parent
        self.folder: Path | None = None
        self.count = 0

    def __call__(self, update: ClientUpdate) -> Loader:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="flexlora-held-", dir=self.parent))
        path = self.folder / f"{self.count}.pt"
        self.count += 1
        torch.save({"client_id": update.client_id, "num_examples": update.num_examples, "meta": dict(update.meta),
                    "modules": {n: (f.A, f.B, f.scale) for n, f in update.modules.items()}}, path)

        def load() -> ClientUpdate:
            d = torch.load(path, weights_only=True)
            path.unlink()
            return ClientUpdate(d["client_id"], d["num_examples"], {n: LoraFactors(A=A, B=B, scale=s) for n, (A, B, s) in d["modules"].items()}, d["meta"])

        return load

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@dataclass
class _Held:
    client_id: str
    norm: float
    load: Loader


class RoundFold:
    """Screen and aggregate one round's updates as they arrive (see the module docstring).

    ``expected`` are the clients that may still send an update (the round's plan); ``specs`` their
    declared per-module ranks (checked on arrival), ``shapes`` the base model's layer shapes.
    ``prepare`` is the method's client-side step after training (HetLoRA's self-pruning), applied to
    an update when it is folded. ``hold_all`` keeps every update and runs today's path at the end
    (what a caller that needs them all asks for: central DP, a transport measurement).

    Use: ``add`` / ``absent`` while the round runs, then ``settle`` (who is accepted, who is rejected
    and why), then ``aggregate`` and ``report``.
    """

    def __init__(
        self,
        method: AggregationMethod,
        shapes: Mapping[str, tuple[int, int]],
        config: ValidationConfig,
        expected: Iterable[str],
        specs: Mapping[str, AdapterSpec] | None = None,
        prepare: Callable[[ClientUpdate], ClientUpdate] | None = None,
        stash: Callable[[ClientUpdate], Loader] = memory_stash,
        hold_all: bool = False,
        diagnose: bool = True,
    ) -> None:
        self.method = method
        self.shapes = shapes
        self.config = config
        self.specs = specs or {}
        self.prepare = prepare
        self.stash = stash
        self.waiting = {str(c) for c in expected}
        self.acc = method.accumulator()
        self.streaming = not hold_all and not isinstance(self.acc, HeldUpdates)
        self.reference = ExactReference(method.exact_aggregate, dtype=method.dtype, device=method.device) if (diagnose and self.streaming) else None
        self.updates: list[ClientUpdate] = []  # hold mode: every update, in order of arrival
        self.rejected: dict[str, list[str]] = {}
        self.norms: dict[str, float] = {}  # passed validation, in order of arrival
        self.held: list[_Held] = []
        self.folded: list[str] = []
        self.error: Exception | None = None  # the method refused an update: the round cannot be aggregated
        self.settled: tuple[list[str], dict[str, list[str]]] | None = None
        self.accepted_updates: list[ClientUpdate] = []  # hold mode, after settle
        self.client_state: dict[str, Any] | None = None  # the round engine's copy of the clients' state that ``prepare`` updates
        self.notes: dict[str, dict[str, Any]] = {}  # what ``prepare`` said per client (the engine's record lines)

    # -- while the round runs ----------------------------------------------------------------------
    def add(self, update: ClientUpdate, reload: Loader | None = None) -> list[str]:
        """Take one client's update; returns the reasons it was rejected on arrival (empty: taken).
        ``reload`` reads the same update again, so a held update needs no copy of its own."""
        if self.settled is not None:
            raise RuntimeError("the round is settled: no more updates")
        self.waiting.discard(update.client_id)
        if not self.streaming:
            self.updates.append(update)
            return []
        problems = validate_update(update, self.shapes, self.specs.get(update.client_id), self.config)
        if problems:
            self.rejected[update.client_id] = problems
            self._release()
            return problems
        norm = screening_norm(update) if self.config.norm_factor is not None else 0.0
        self.norms[update.client_id] = norm
        self._release()  # the new norm may raise the bound
        if self._certain(norm):
            self._fold(update)
        else:
            self.held.append(_Held(update.client_id, norm, reload or self.stash(update)))
        return []

    def absent(self, client_id: str) -> None:
        """A client expected this round will send nothing (it failed or timed out)."""
        self.waiting.discard(str(client_id))
        if self.streaming:
            self._release()

    # -- the end of the round ----------------------------------------------------------------------
    def settle(self) -> tuple[list[str], dict[str, list[str]]]:
        """The screen's verdict, as :func:`flexlora.validate.screen_updates` gives it: the accepted
        client ids (in order of arrival) and ``{client_id: reasons}`` for the rejected ones. The
        accepted held updates are folded now."""
        if self.settled is not None:
            return self.settled
        try:
            if not self.streaming:
                accepted, rejected = screen_updates(self.updates, self.shapes, self.specs, self.config)
                self.updates = []
                self.accepted_updates = accepted
                self.settled = ([u.client_id for u in accepted], rejected)
                return self.settled
            self.waiting.clear()
            by_norm = norm_verdicts(self.norms, self.config)
            for h in self.held:
                if h.client_id not in by_norm:
                    self._fold(h.load())
            self.held = []
            late = sorted(set(self.folded) & set(by_norm))
            if late:  # cannot happen: an update is folded only when no completion of the round can reject it
                raise RuntimeError(f"updates {late} were folded and then rejected by the norm screen")
            self.settled = ([c for c in self.norms if c not in by_norm], {**self.rejected, **by_norm})
            return self.settled
        finally:
            close = getattr(self.stash, "close", None)
            if close is not None:
                close()

    def aggregate(self, round: int) -> ServerState:
        """The method's state of the round from the accepted updates (raises UpdateError when the
        method refuses them, as ``aggregate`` would)."""
        self.settle()
        if not self.streaming:
            return self.method.aggregate(self.accepted_updates, round=round)
        if self.error is not None:
            raise self.error
        return self.acc.finish(round)

    def report(self, state: ServerState, share_ranks: Mapping[str, Iterable[int]] | None = None) -> dict[str, dict]:
        """:func:`flexlora.diagnostics.aggregation_report` of the round's state."""
        exact = self.method.exact_aggregate
        if not self.streaming:
            weights = [state.weights[u.client_id] for u in self.accepted_updates]
            return aggregation_report(state, self.accepted_updates, weights, share_ranks, exact=exact)
        if self.reference is None:
            raise RuntimeError("this fold keeps no diagnostics reference (diagnose=False)")
        return aggregation_report(state, [], [], share_ranks, exact=exact, reference=self.reference)

    # -- helpers -----------------------------------------------------------------------------------
    def _certain(self, norm: float) -> bool:
        """No completion of the round can make the screen reject an update of this norm: the median
        can fall no lower than with every expected client replying a zero norm."""
        if self.config.norm_factor is None or norm == 0.0:
            return True
        lowest = statistics.median([*self.norms.values(), *([0.0] * len(self.waiting))])
        return norm <= self.config.norm_factor * lowest

    def _release(self) -> None:
        """Fold, in order of arrival, the held updates the screen can no longer reject."""
        waiting = []
        for h in self.held:
            if self._certain(h.norm):
                self._fold(h.load())
            else:
                waiting.append(h)
        self.held = waiting

    def _fold(self, update: ClientUpdate) -> None:
        self.folded.append(update.client_id)
        if self.error is not None:
            return
        if self.prepare is not None:
            update = self.prepare(update)
        try:
            self.acc.add(update)
        except Exception as e:  # the method refuses the round (e.g. mixed ranks for FedAvg): say so at aggregate()
            self.error = e
            return
        if self.reference is not None:
            self.reference.add(update, float(update.num_examples))
