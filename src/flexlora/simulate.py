"""The in-process federated simulator: sample, train, validate, aggregate, evaluate, checkpoint.

One base model serves every client in turn (see :mod:`flexlora.train`), so thousands of clients
cost no more memory than sixteen. Everything random is derived from the run seed and the round
number (client sampling, failures, local shuffling and dropout), which makes a resumed run
produce the same numbers as an uninterrupted one: the checkpoint holds only the server state,
the clients' persistent state and, for FLoRA, the update merged into the base weights.

A run is the round engine (:mod:`flexlora.rounds`: who trains at which ranks, the server's close
step), the local trainer, the global model (:mod:`flexlora.runner`: evaluation, final adapters) and the
run folder (:mod:`flexlora.output`); :meth:`Simulation.run_round` is one round, read top to bottom.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flexlora.base_eval import BaseEvaluations
from flexlora.config import RunConfig
from flexlora.data.types import ClientData
from flexlora.diagnostics import summarise
from flexlora.failures import client_failure, garbage_update
from flexlora.fold import DiskStash
from flexlora.output import RunOutput
from flexlora.rounds import ClientStatus, PlannedClient, RoundOutcome, factor_bytes, metrics_entry
from flexlora.runner import aggregation_spectra, open_run, run_rounds
from flexlora.slora import SparseWarmup
from flexlora.train import ClientOutOfMemory
from flexlora.update import ClientUpdate, ServerState

class Simulation:
    """A federated run in one process. ``run()`` is resumable at round granularity."""

    def __init__(
        self, cfg: RunConfig, out: Path, model=None, tokenizer=None, clients: list[ClientData] | None = None, progress: bool = True, base_evals: BaseEvaluations | None = None
    ) -> None:
        self.cfg = cfg
        self.out = Path(out)
        # model, clients, method, engine, evaluation (base_evals: round-0 evaluations shared with other runs, compare)
        self.server = open_run(cfg, model, tokenizer, clients, progress, base_evals)
        self.engine, self.trainer = self.server.engine, self.server.trainer
        self.output = RunOutput(cfg, self.out)
        self.warmup = SparseWarmup(self.engine, self.trainer) if self.server.algorithm.sparse_warmup else None  # SLoRA's stage 1

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) every round (:func:`flexlora.runner.run_rounds`); returns the summary."""
        return run_rounds(self.server, self.output, self.run_round, resume)

    def run_round(self, rnd: int, state: ServerState, bar=None) -> tuple[dict[str, Any], ServerState]:
        """One round: a round of SLoRA's sparse warm-up stage, or a LoRA round."""
        if self.warmup is None or not self.warmup.covers(rnd):
            return self.lora_round(rnd, state, bar)
        rec = self.warmup.run_round(rnd, state, bar).to_dict()  # sparse full weights, merged into the base weights
        if self.warmup.is_last(rnd):  # the stage's update becomes the LoRA initialisation; the base weights go back
            state = self.warmup.transition(rnd)
            rec["slora_transition"] = summarise(aggregation_spectra(state))
        self.server.set_base_weights()
        return rec, state

    def lora_round(self, rnd: int, state: ServerState, bar=None) -> tuple[dict[str, Any], ServerState]:
        """One LoRA round in this process: the engine plans it, the local trainer trains every client
        in turn (with the configured failures injected), the engine closes it."""
        plan = self.engine.plan(rnd, state)
        self.trainer.cfg = self.engine.method.local_training(self.cfg.train, round=rnd)  # e.g. RoLoRA: the factor this round trains
        # each update is folded into the server's running sums as soon as its client has trained (the
        # server keeps about one dense update, not every client's factors); one the norm screen could
        # still reject waits in a temporary file
        fold = self.engine.open_fold(plan, stash=DiskStash())
        outcome = RoundOutcome(updates=[], entries=[], dropped={}, bytes_up=0, train_seconds=0.0, fold=fold)
        task = bar.add_task(f"round {rnd}: clients", total=len(plan.clients)) if bar is not None else None
        for planned in plan.clients:
            update = self._train_planned(rnd, planned, outcome)
            if update is not None:
                outcome.bytes_up += factor_bytes(update.modules.values())
                fold.add(update)
            else:
                fold.absent(planned.cid)
            outcome.entries.append(planned.entry)
            if bar is not None:
                bar.advance(task)
        if bar is not None:
            bar.remove_task(task)
        outcome.train_seconds = time.perf_counter() - plan.started
        record, new_state = self.engine.close(plan, state, outcome)
        if new_state.base_delta is not None:
            self.server.set_base_weights()  # the merged update is part of everybody's base weights from now on
        return record.to_dict(), new_state

    def _train_planned(self, rnd: int, planned: PlannedClient, outcome: RoundOutcome) -> ClientUpdate | None:
        """One client's local training; its status goes into its record line, a failure into ``outcome.dropped``."""
        cid, entry = planned.cid, planned.entry
        failure, fail_rng = client_failure(self.cfg.federation.seed, self.cfg.failures, rnd, planned.client.client_id)
        if failure in ("crash", "straggle"):
            outcome.dropped[cid] = ["crashed during local training" if failure == "crash" else "missed the round timeout"]
            entry["status"] = ClientStatus(failure)
            return None
        try:
            result = self.trainer.train_client(planned.client, planned.spec, planned.share, seed=self.engine.train_seed(rnd, planned.client.client_id))
        except ClientOutOfMemory as e:  # memory already released by the trainer
            outcome.dropped[cid] = [str(e)]
            entry["status"] = ClientStatus.OOM
            return None
        except (ValueError, RuntimeError) as e:  # one client's failure must not end the round
            outcome.dropped[cid] = [f"local training failed: {e}"]
            entry["status"] = ClientStatus.ERROR
            return None
        entry.update(status=ClientStatus.OK, **metrics_entry(result.metrics))
        return garbage_update(result.update, fail_rng) if failure == "garbage" else result.update
