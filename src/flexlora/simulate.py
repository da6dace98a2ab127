"""The in-process federated simulator: sample, train, validate, aggregate, evaluate, checkpoint.

One base model serves every client in turn (see :mod:`flexlora.train`), so thousands of clients
cost no more memory than sixteen. Everything random is derived from the run seed and the round
number (client sampling, failures, local shuffling and dropout), which makes a resumed run
produce the same numbers as an uninterrupted one: the checkpoint holds only the server state,
the clients' persistent state and, for FLoRA, the update merged into the base weights.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from flexlora.algorithms import get_algorithm
from flexlora.base_eval import BaseEvaluations, evaluation_key, model_digest
from flexlora.checkpoint import CheckpointWriter, load_checkpoint, state_from_dict, state_to_dict
from flexlora.config import ConfigError, RunConfig, config_changes, config_fingerprint
from flexlora.data.clients import load_clients, why_nothing_to_evaluate
from flexlora.data.types import ClientData
from flexlora.diagnostics import spectrum_summary, summarise
from flexlora.evaluate import EvalConfig, evaluate_clients, pass_precision
from flexlora.failures import client_failure, garbage_update
from flexlora.stats import summary_intervals
from flexlora.fold import DiskStash
from flexlora.fsutil import atomic_directory, atomic_write_text, mark_output
from flexlora.methods import AggregationMethod, get_method
from flexlora.models import is_low_precision, is_quantized, load_model, resolve_device, resolve_dtype, weight_is_transposed
from flexlora.peft_io import write_adapter
from flexlora.precision import explain_precision
from flexlora.resources import group_members, module_group, target_module_names, unmatched_targets
from flexlora.rounds import (
    ClientStatus,
    Federation,
    PlannedClient,
    RoundEngine,
    RoundOutcome,
    build_federation,
    factor_bytes,
    metrics_entry,
)
from flexlora.slora import SparseWarmup
from flexlora.train import ClientOutOfMemory, LocalTrainer, apply_dense_delta, use_deterministic_kernels
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, ServerState

METRICS = "metrics.jsonl"
RoundFn = Callable[[int, ServerState, Any], "tuple[dict[str, Any], ServerState]"]


def check_run(cfg: RunConfig, model, clients: list[ClientData]) -> tuple[AggregationMethod, Federation]:
    """The run's method and federation, with everything refused that model and data decide (ranks the
    method cannot mix, ranks a layer cannot hold, too few clients): before any training. ``compare``
    calls it for every run before the first one trains."""
    fed = cfg.federation
    device = resolve_device(fed.server_device, "federation.server_device")
    method = get_method(fed.aggregation, dtype=resolve_dtype(fed.server_dtype), seed=fed.seed, device=device, **dict(fed.method_options))
    federation = build_federation(cfg, clients, target_module_names(model, cfg.lora.targets))
    method.check_specs(list(federation.specs.values()), labels=[f"client {cid} ({federation.types.get(cid)})" for cid in federation.specs])
    return method, federation


class Simulation:
    """A federated run in one process. ``run()`` is resumable at round granularity."""

    def __init__(
        self, cfg: RunConfig, out: Path, model=None, tokenizer=None, clients: list[ClientData] | None = None, progress: bool = True, base_evals: BaseEvaluations | None = None
    ) -> None:
        self.cfg = cfg
        self.base_evals = base_evals  # round-0 evaluations of the base model shared with other runs (compare)
        self.out = Path(out)
        self.progress = progress
        self.last_good: tuple[int, ServerState] | None = None  # the last finished round and its whole state
        if cfg.train.deterministic:
            use_deterministic_kernels()  # before the model's first CUDA kernel (cuBLAS reads its workspace setting once)
        if model is None:
            model, tokenizer = load_model(cfg.model)
        self.model, self.tokenizer = model, tokenizer
        self.clients = clients if clients is not None else load_clients(cfg)
        self.server_dtype = resolve_dtype(cfg.federation.server_dtype)
        self.method, federation = check_run(cfg, self.model, self.clients)
        self.engine = RoundEngine(cfg, federation, self.method, self.server_dtype)
        self.trainer = LocalTrainer(self.model, self.tokenizer, cfg.lora.targets, self.method.local_training(cfg.train), self.method.local_penalty(cfg.train))
        self.algorithm = get_algorithm(cfg.federation.algorithm)
        self.warmup = SparseWarmup(self.engine, self.trainer) if self.algorithm.sparse_warmup else None  # SLoRA's stage 1
        # original weights of every target layer, in host memory (not a second copy on the accelerator):
        # evaluation and FLoRA merges set W = W0 + delta exactly (in float32 for a bfloat16 base, see
        # apply_dense_delta). A quantised or bfloat16/float16 base is evaluated with the global update
        # attached as a float32 adapter instead (quantised weights cannot be merged into at all).
        self.quantized = is_quantized(self.model)
        self.evaluate_as_adapter = self.quantized or is_low_precision(next(self.model.parameters()).dtype)
        # (kept only where something merges: every evaluation of a float32 base, merging methods, SLoRA's stage 1)
        needs_originals = not self.quantized and (not self.evaluate_as_adapter or self.method.merges_into_base or self.algorithm.merges_into_base())
        self.originals = {n: self.model.get_submodule(n).weight.detach().to("cpu", copy=True) for n in self.fed.shapes} if needs_originals else {}

    @property
    def fed(self) -> Federation:
        """Who trains and is evaluated (the engine's: the Flower server replaces it with its nodes)."""
        return self.engine.fed

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False, round_fn: RoundFn | None = None) -> dict[str, Any]:
        """Run (or resume) every round. ``round_fn(round, state, bar) -> (record, state)`` replaces
        the in-process round (the Flower ServerApp passes one that trains on remote nodes)."""
        cfg = self.cfg
        round_fn = round_fn or self.run_round
        had_files = self.out.is_dir() and any(self.out.iterdir())
        ckpt = load_checkpoint(self.out) if resume else None
        if ckpt is not None:
            self.check_resumable(ckpt)
            done = _read_summary(self.out)
            if ckpt["round"] >= cfg.federation.rounds and done is not None and done.get("rounds") == ckpt["round"]:
                print(
                    f"{cfg.name}: {self.out} is a complete run ({ckpt['round']} of {cfg.federation.rounds} rounds): nothing to do; "
                    f"--set federation.rounds=N (N > {ckpt['round']}) extends it",
                    file=sys.stderr,
                )
                return done
            planned = (ckpt.get("config") or {}).get("federation", {}).get("rounds", cfg.federation.rounds)
            if planned < cfg.federation.rounds:
                print(f"{cfg.name}: extending the run from {planned} to {cfg.federation.rounds} rounds (resuming after round {ckpt['round']})", file=sys.stderr)
        elif resume and had_files:
            print(f"{cfg.name}: {self.out} holds no checkpoint yet (the run stopped in round 1): starting at round 1", file=sys.stderr)
        self.out.mkdir(parents=True, exist_ok=True)
        mark_output(self.out, "run")
        fingerprint = config_fingerprint(cfg)
        start_round = 1
        state = self.method.initial_state(self.fed.shapes)
        history: list[dict[str, Any]] = []
        if ckpt is not None:
            state = state_from_dict(ckpt["state"])
            self.engine.merged = ckpt["merged"]
            self.engine.client_state = ckpt["client_state"]
            start_round = ckpt["round"] + 1
            history = read_metrics(self.out / METRICS, upto=ckpt["round"])
            if ckpt.get("record") and (not history or history[-1].get("round", 0) < ckpt["round"]):
                history.append(ckpt["record"])  # killed between the checkpoint and its metrics line
        elif resume is False and (self.out / METRICS).exists():
            (self.out / METRICS).unlink()
        _write_metrics(self.out / METRICS, history)
        atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
        for line in self.start_notes():
            print(f"{cfg.name}: {line}", file=sys.stderr)
        self._set_base_weights()

        if start_round == 1 and cfg.eval.at_start and self.fed.eval_clients:
            rec = {"round": 0, "eval": self.evaluate_start(state)}
            history.append(rec)
            _append(self.out / METRICS, rec)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        writer = CheckpointWriter(self.out)  # a round's checkpoint lands while the next one trains
        try:
            with Progress(*columns, disable=not self.progress, transient=False) as bar:
                state = self._rounds(start_round, state, history, fingerprint, round_fn, bar, writer)
            writer.wait()
        finally:
            writer.wait(raise_error=False)  # an error of the loop itself wins; the last write still lands
        return self.finish(state, history)

    def check_resumable(self, ckpt: dict[str, Any]) -> None:
        """Refuse a checkpoint made with another config. Raising ``federation.rounds`` is not a change
        but an extension: everything a round does is seeded by (seed, round), not by the number of rounds,
        so the extended run gives an uninterrupted longer run's adapters (its metrics hold one more
        evaluation: the old last round's)."""
        cfg = self.cfg
        if ckpt["fingerprint"] == config_fingerprint(cfg):
            return
        saved = ckpt.get("config") or _saved_config(self.out)
        if saved is None:
            changed = ["(the checkpoint's config is not saved beside it)"]
        else:
            changed = config_changes(saved, cfg, allowed=("federation.rounds",))
            if cfg.federation.rounds < ckpt["round"]:
                changed.insert(0, f"federation.rounds = {cfg.federation.rounds} is below the checkpoint's round {ckpt['round']} (rounds can only be raised)")
        if changed:
            raise ConfigError(
                f"{self.out}: the checkpoint was made with a different config ({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
                "resume with the same config (only federation.rounds may be raised) or use a new --out"
            )

    def _rounds(self, start_round: int, state: ServerState, history: list[dict[str, Any]], fingerprint: str, round_fn: RoundFn, bar, writer: CheckpointWriter) -> ServerState:
        """Rounds ``start_round``.. of the run; appends to ``history``, returns the last state."""
        cfg = self.cfg
        rounds_task = bar.add_task(f"{cfg.name}: rounds", total=cfg.federation.rounds, completed=start_round - 1)
        for rnd in range(start_round, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            if self.warmup is not None and self.warmup.covers(rnd):  # SLoRA's stage 1: sparse full weights merged into the base
                rec = self.warmup.run_round(rnd, state, bar).to_dict()
                if self.warmup.is_last(rnd):  # its update becomes the LoRA initialisation; the base weights go back
                    state = self.warmup.transition(rnd)
                    rec["slora_transition"] = summarise(aggregation_spectra(state))
                self._set_base_weights()
            else:
                rec, state = round_fn(rnd, state, bar)
            evaluate_now = (cfg.eval.every and rnd % cfg.eval.every == 0) or rnd == cfg.federation.rounds
            if evaluate_now and self.fed.eval_clients:
                t_eval = time.perf_counter()
                rec["eval"] = self.evaluate(state)
                rec.setdefault("timings", {})["eval"] = time.perf_counter() - t_eval
            rec.setdefault("timings", {})
            rec = json.loads(json.dumps(rec, sort_keys=True, default=_json_default))  # plain data from here on
            t_ckpt = time.perf_counter()
            writer.wait()  # the previous round's write (long done: a round trained since)
            # what the background write reads: this round's state (never changed in place) and copies of
            # the containers the next round changes
            snapshot = {
                "round": rnd,
                "fingerprint": fingerprint,
                "config": cfg.to_dict(),
                "merged": dict(self.engine.merged),
                "client_state": copy.deepcopy(self.engine.client_state),
                "record": copy.deepcopy(rec),
            }
            last_round = rnd == cfg.federation.rounds

            def payload(snapshot: dict[str, Any] = snapshot, state: ServerState = state, last_round: bool = last_round) -> dict[str, Any]:
                return {**snapshot, "state": state_to_dict(self.engine.checkpoint_state(state, last_round=last_round))}

            self.last_good = (rnd, state)  # whole, unlike a checkpoint between rounds (see RoundEngine.checkpoint_state)
            rec["timings"]["checkpoint"] = time.perf_counter() - t_ckpt  # what the round waited for; the write goes on behind
            rec["timings"]["round"] = time.perf_counter() - t_round  # everything above, wall clock
            history.append(rec)

            def landed(rec: dict[str, Any] = rec) -> None:  # the metrics line only once its checkpoint is in place
                rec["timings"]["checkpoint_write"] = writer.last_write_seconds
                _append(self.out / METRICS, rec)

            writer.start(payload, then=landed)
            bar.advance(rounds_task)
        return state

    def eval_note(self) -> str | None:
        """Why nothing will be evaluated (None when something will)."""
        if self.fed.eval_clients:
            return None
        return why_nothing_to_evaluate(self.cfg, self.clients) or "no held-out client has examples to evaluate"

    def trained_modules(self) -> dict[str, Any]:
        """Which layers the run trains, by module group, and each resource type's rank per group
        (``"4-8"`` where capping at a layer's width makes them differ)."""
        groups = dict(self.cfg.lora.groups)
        members = group_members(list(self.fed.shapes), groups)
        ranks: dict[str, dict[str, str]] = {}
        for cid, t in sorted(self.fed.types.items()):
            if t in ranks or cid not in self.fed.specs:
                continue
            per_group: dict[str, set[int]] = {}
            for name, spec in self.fed.specs[cid].items():
                per_group.setdefault(module_group(name, groups), set()).add(spec.rank)
            ranks[t] = {g: (f"{min(r)}-{max(r)}" if len(r) > 1 else str(min(r))) for g, r in sorted(per_group.items())}
        return {"layers": len(self.fed.shapes), "groups": members, "ranks": dict(sorted(ranks.items())), "unmatched_targets": unmatched_targets(self.model, self.cfg.lora.targets)}

    def start_notes(self) -> list[str]:
        """What the run trains and evaluates, said before the first round."""
        info = self.trained_modules()
        targets = self.cfg.lora.targets
        lines = [
            f"trains {info['layers']} layers (lora.targets = {targets if isinstance(targets, str) else ', '.join(targets)}): "
            + "; ".join(f"{g}: {', '.join(m)}" for g, m in info["groups"].items())
        ]
        if info["ranks"]:
            order = list(info["groups"])
            lines.append(f"ranks ({' / '.join(order)}) per resource type: " + ", ".join(f"{t} {' / '.join(r.get(g, '-') for g in order)}" for t, r in info["ranks"].items()))
        lines += self.algorithm.notes()  # what the algorithm sets (fedavg_sgd: the optimiser)
        if self.fed.notes:  # the rank a layer cannot hold is capped (lora.cap_at_width), said before round 1
            lines.append(
                "ranks above a layer's width are capped at it (a larger rank adds nothing; lora.cap_at_width = false refuses them): "
                + ", ".join(self.fed.notes)
            )
        asked, training = self.cfg.federation.clients_per_round, len(self.fed.train_clients)
        if asked is not None and asked > training:
            lines.append(f"federation.clients_per_round = {asked} but only {training} clients train: every round trains all {training}")
        if info["unmatched_targets"]:
            lines.append(
                f"lora.targets names no layer of this model: {', '.join(info['unmatched_targets'])} (they train nothing; "
                'lora.targets = "all-linear" trains every linear layer)'
            )
        device = next(self.model.parameters()).device
        scoring = f", scoring {pass_precision(self.cfg.eval, device, 'scoring')}" if self.cfg.eval.eval_loss or self.cfg.eval.teacher_forced else ""
        lines.append(f"precision: training {explain_precision(self.cfg.train.precision, device)}; evaluation: generation {pass_precision(self.cfg.eval, device, 'generation')}{scoring}")
        note = self.eval_note()
        if note:
            lines.append(f"nothing will be evaluated (Rouge-L stays empty): {note}")
        return lines

    def run_round(self, rnd: int, state: ServerState, bar=None) -> tuple[dict[str, Any], ServerState]:
        """One round in this process: the engine plans it, the local trainer trains every client in
        turn (with the configured failures injected), the engine closes it."""
        plan = self.engine.plan(rnd, state)
        self.trainer.cfg = self.method.local_training(self.cfg.train, round=rnd)  # e.g. RoLoRA: the factor this round trains
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
            self._set_base_weights()  # the merged update is part of everybody's base weights from now on
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
        finally:
            self.model = self.trainer.model
        entry.update(status=ClientStatus.OK, **metrics_entry(result.metrics))
        return garbage_update(result.update, fail_rng) if failure == "garbage" else result.update

    # -- evaluation and outputs --------------------------------------------------------------------
    def adapter_deltas(self, state: ServerState) -> dict[str, Tensor]:
        """The global adapter's dense update per module (empty when clients restart LoRA: FLoRA's whole
        update is merged into the base weights, see :attr:`merged`)."""
        device = self.method.device  # the server's device builds the dense products (federation.server_device)
        return {name: (gm.B.to(device, self.server_dtype) @ gm.A.to(device, self.server_dtype)) for name, gm in state.adapter.items() if gm.rank}

    def global_deltas(self, state: ServerState) -> dict[str, Tensor]:
        """Everything the global model adds to the original base weights."""
        deltas = {n: d.clone() for n, d in self.engine.merged.items()}
        for name, d in self.adapter_deltas(state).items():
            deltas[name] = deltas[name].to(d.device) + d if name in deltas else d
        return deltas

    def _set_base_weights(self, extra: dict[str, Tensor] | None = None) -> None:
        deltas = dict(self.engine.merged)
        for name, d in (extra or {}).items():
            deltas[name] = deltas[name].to(d.device) + d if name in deltas else d
        apply_dense_delta(self.model, deltas, self.originals)

    def evaluate(self, state: ServerState) -> dict[str, Any]:
        cfg = self.cfg.eval
        ecfg = EvalConfig(**{k: getattr(cfg, k) for k in EvalConfig.__dataclass_fields__})
        if self.evaluate_as_adapter:
            return self._evaluate_as_adapter(state, ecfg)
        self._set_base_weights(self.adapter_deltas(state))
        try:
            result = evaluate_clients(self.model, self.tokenizer, self.fed.eval_clients, ecfg, progress=self.progress)
        finally:
            self._set_base_weights()
        return result.to_dict()

    def evaluate_start(self, state: ServerState) -> dict[str, Any]:
        """Round 0's evaluation. Before any update (an empty state, nothing merged) it scores the base
        model itself; with ``base_evals`` a run whose model, held-out examples and eval settings match
        an earlier run's (:func:`flexlora.base_eval.evaluation_key`) takes that run's record instead of
        scoring the same thing again (``shared_from`` names the run)."""
        if self.base_evals is None or self.engine.merged or any(gm.rank for gm in state.adapter.values()):
            return self.evaluate(state)
        cfg = self.cfg.eval
        ecfg = EvalConfig(**{k: getattr(cfg, k) for k in EvalConfig.__dataclass_fields__})
        key = evaluation_key(model_digest(self.model, self.tokenizer), next(self.model.parameters()).device, self.fed.eval_clients, ecfg)
        record, source = self.base_evals.get(key, self.cfg.name, lambda: self.evaluate(state))
        if source is not None:
            print(f"{self.cfg.name}: round 0 evaluates the base model, as {source} did with the same examples and settings: its record is reused", file=sys.stderr)
        return record

    def _evaluate_as_adapter(self, state: ServerState, ecfg: EvalConfig) -> dict[str, Any]:
        """A quantised base cannot take ``W0 + delta``, and a bfloat16 one would round it (a delta of
        ~1e-4 is the size of bfloat16's spacing): the global update is attached as a float32 LoRA
        adapter at its own rank with scale 1 (``B @ A`` exactly) on the untouched base, evaluated, and
        removed. Merged updates (FLoRA) are already in the base, held in float32."""
        modules = {n: gm for n, gm in state.adapter.items() if gm.rank}
        if not modules:
            return evaluate_clients(self.model, self.tokenizer, self.fed.eval_clients, ecfg, progress=self.progress).to_dict()
        spec = {n: ModuleSpec(rank=gm.rank, alpha=float(gm.rank)) for n, gm in modules.items()}
        factors = {n: LoraFactors(A=gm.A.float(), B=gm.B.float(), scale=1.0) for n, gm in modules.items()}
        peft_model = self.trainer.attach(spec)
        try:
            self.trainer.load_share(peft_model, factors)
            peft_model.eval()
            result = evaluate_clients(peft_model, self.tokenizer, self.fed.eval_clients, ecfg, progress=self.progress)
        finally:
            self.trainer.detach(peft_model)
            self.model = self.trainer.model
        return result.to_dict()

    def restore_base(self) -> None:
        """Put the original base weights back (the model may serve another run next)."""
        apply_dense_delta(self.model, {}, self.originals)

    def _privacy_summary(self, rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
        pv = self.cfg.privacy
        if not pv.clips:
            return None
        spent = self.engine.privacy_spent(rounds[-1]["round"] if rounds else 0) or {}  # the rounds that ran (a stopped run: fewer)
        clipped = sum(h.get("privacy", {}).get("clipped", 0) for h in rounds)
        seen = sum(h.get("privacy", {}).get("of", 0) for h in rounds)
        return {"clip_norm": pv.clip_norm, "noise_multiplier": pv.noise_multiplier, "clipped_updates": clipped, "updates": seen, **spent}

    def finish(self, state: ServerState, history: list[dict[str, Any]]) -> dict[str, Any]:
        final = self.out / "final"
        with atomic_directory(final) as staging:  # whole and new: never mixed with an older run's adapters
            self.write_global_adapters(state, staging)
        evals = [h for h in history if "eval" in h]
        last = evals[-1]["eval"] if evals else None
        first = evals[0]["eval"] if evals and evals[0]["round"] == 0 else None
        rounds = [h for h in history if h.get("round", 0) > 0]
        summary = {
            "name": self.cfg.name,
            "aggregation": self.method.name,
            "algorithm": self.cfg.federation.algorithm,
            "distribution": ("custom" if self.cfg.resources.custom_distribution else self.cfg.resources.distribution) if self.cfg.resources.mode == "types" else "budget",
            "custom_distribution": dict(self.cfg.resources.custom_distribution) or None,
            "rounds": self.cfg.federation.rounds,
            "train_clients": len(self.fed.train_clients),
            "eval_clients": len(self.fed.eval_clients),
            "eval_note": self.eval_note(),
            "type_counts": _counts(self.fed.types.values()),
            "rank_notes": self.fed.notes,
            "modules": self.trained_modules(),
            "tokens": sum(h.get("tokens", 0) for h in rounds),
            "train_seconds": sum(h.get("timings", {}).get("train", 0.0) for h in rounds),
            "final_train_loss": rounds[-1].get("train_loss") if rounds else None,
            "rouge_l_weighted": last["rouge_l_weighted"] if last else None,
            "rouge_l_mean": last["rouge_l_mean"] if last else None,
            "base_rouge_l_weighted": first["rouge_l_weighted"] if first else None,
            "proxy_eval_loss": last.get("proxy_eval_loss") if last else None,
            "intervals": summary_intervals(last, first),  # 95% bootstrap intervals of the figures above (flexlora.stats)
            "dropped_updates": sum(len(h.get("dropped", {})) for h in rounds),
            "skipped_rounds": [h["round"] for h in rounds if "skipped" in h],
            "final_adapters": str(final),
            "privacy": self._privacy_summary(rounds),
        }
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        return summary

    def write_global_adapters(self, state: ServerState, folder: Path) -> None:
        """``global/``: the exact global update (base-weight merges included) as a PEFT adapter at
        full rank with scale 1; ``<type>/``: the share a client of each resource type receives.

        A module with nothing merged into its base weights is written as the state's own factors
        (``B @ A`` bit for bit, at the state's rank, as ``flexlora aggregate`` and the Strategy write
        it); only a merged one (FLoRA, SLoRA's stage 1, FedEx's residual) is the dense sum's SVD."""
        factors, specs = {}, {}
        for name, gm in state.adapter.items():
            if gm.rank and name not in self.engine.merged:
                factors[name] = LoraFactors(A=gm.A.float().cpu(), B=gm.B.float().cpu(), scale=1.0)
                specs[name] = ModuleSpec(rank=gm.rank, alpha=float(gm.rank))
        deltas = {n: d for n, d in (self.global_deltas(state) if self.engine.merged else {}).items() if n not in factors}
        device = self.method.device  # the final dense SVDs run on the server's device
        for name, d in deltas.items():
            U, S, Vh = (t.cpu() for t in torch.linalg.svd(d.to(device), full_matrices=False))
            k = max(1, int((S > S.max() * 1e-12).sum())) if S.numel() else 1
            factors[name] = LoraFactors(A=Vh[:k].float(), B=(U[:, :k] * S[:k]).float(), scale=1.0)
            specs[name] = ModuleSpec(rank=k, alpha=float(k))
        transposed = any(weight_is_transposed(self.model.get_submodule(n)) for n in self.fed.shapes)
        template = {"base_model_name_or_path": str(self.cfg.model.source), "lora_dropout": self.cfg.train.lora_dropout, "fan_in_fan_out": transposed}
        if factors:
            write_adapter(folder / "global", factors, specs, template=template)
        if not self.method.restarts_adapter and self.cfg.resources.mode == "types":
            seen = {}
            for cid, t in sorted(self.fed.types.items()):
                seen.setdefault(t, self.fed.specs[cid])
            for t, spec in seen.items():
                share = self.method.share_for(state, spec)
                write_adapter(folder / t, {n: LoraFactors(f.A.float(), f.B.float(), f.scale) for n, f in share.items()}, spec, template=template)


# -- helpers ----------------------------------------------------------------------------------------
def _saved_config(out: Path) -> dict[str, Any] | None:
    """A checkpoint written before checkpoints carried their config: the run's config.json."""
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _read_summary(out: Path) -> dict[str, Any] | None:
    """A finished run's summary.json (None when the run has not finished)."""
    try:
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def aggregation_spectra(state: ServerState) -> dict[str, dict]:
    """Spectrum summaries of an SVD-ordered state (no client updates to compare against)."""
    return {n: spectrum_summary(gm.spectrum, []) for n, gm in state.adapter.items() if gm.spectrum is not None}


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True, default=_json_default) + "\n")
        f.flush()


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(h, sort_keys=True, default=_json_default) + "\n" for h in history))


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is redone
        if rec.get("round", 0) <= upto:
            out.append(rec)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
