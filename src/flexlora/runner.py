"""A run on the server's side, whoever trains its clients (this process or Flower nodes): the global
model (the base model with what the run merged into it, evaluated with the global adapter, written
out as PEFT adapters), and the run's loop (resume, rounds, evaluation, checkpoints, summary) with the
round itself passed in. The simulator (:mod:`flexlora.simulate`) and the Flower server
(:mod:`flexlora.flower.server`) each build a run from the round engine and a :class:`~flexlora.output.RunOutput`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from flexlora.algorithms import get_algorithm
from flexlora.base_eval import BaseEvaluations, evaluation_key, model_digest
from flexlora.config import EvalConfig, RunConfig
from flexlora.data.clients import load_clients, why_nothing_to_evaluate
from flexlora.data.types import ClientData
from flexlora.diagnostics import spectrum_summary
from flexlora.evaluate import evaluate_clients
from flexlora.methods import AggregationMethod, get_method
from flexlora.models import is_low_precision, is_quantized, load_model, model_device, resolve_device, resolve_dtype, weight_is_transposed
from flexlora.output import RunOutput
from flexlora.peft_io import write_adapter
from flexlora.precision import explain_precision, pass_precision
from flexlora.resources import group_members, module_group, target_module_names, unmatched_targets
from flexlora.rounds import Federation, RoundEngine, build_federation
from flexlora.stats import summary_intervals
from flexlora.train import LocalTrainer, apply_dense_delta, use_deterministic_kernels
from flexlora.update import LoraFactors, ModuleSpec, ServerState

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


def open_run(cfg: RunConfig, model=None, tokenizer=None, clients: list[ClientData] | None = None, progress: bool = True,
             base_evals: BaseEvaluations | None = None) -> "GlobalModel":
    """The parts every runner shares: the model (loaded unless given), the clients, the method and
    federation (checked before any work), the round engine, the trainer that owns the model."""
    if cfg.train.deterministic:
        use_deterministic_kernels()  # before the model's first CUDA kernel (cuBLAS reads its workspace setting once)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    clients = clients if clients is not None else load_clients(cfg)
    method, federation = check_run(cfg, model, clients)
    engine = RoundEngine(cfg, federation, method, resolve_dtype(cfg.federation.server_dtype))
    trainer = LocalTrainer(model, tokenizer, cfg.lora.targets, method.local_training(cfg.train), method.local_penalty(cfg.train))
    return GlobalModel(cfg, engine, trainer, clients, progress, base_evals)


def run_rounds(server: "GlobalModel", output: RunOutput, round_fn: RoundFn, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) every round of ``server``'s run into ``output``: ``round_fn(round, state, bar)
    -> (record, state)`` is one round (the simulator's trains in this process, the Flower server's on
    the nodes); after it the global model is evaluated (every ``eval.every`` rounds and after the last)
    and the round is checkpointed. Returns the summary."""
    cfg, engine = server.cfg, server.engine
    start = output.start(resume, engine)
    if start.complete is not None:
        return start.complete
    state, history = start.state, start.history
    for line in server.start_notes():
        print(f"{cfg.name}: {line}", file=sys.stderr)
    server.set_base_weights()
    if start.round == 1 and cfg.eval.at_start and server.fed.eval_clients:  # the base model's score
        rec = {"round": 0, "eval": server.evaluate_start(state)}
        history.append(rec)
        output.append(rec)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with output.rounds(), Progress(*columns, disable=not server.progress, transient=False) as bar:
        rounds_task = bar.add_task(f"{cfg.name}: rounds", total=cfg.federation.rounds, completed=start.round - 1)
        for rnd in range(start.round, cfg.federation.rounds + 1):
            t_round = time.perf_counter()
            rec, state = round_fn(rnd, state, bar)
            if ((cfg.eval.every and rnd % cfg.eval.every == 0) or rnd == cfg.federation.rounds) and server.fed.eval_clients:
                t_eval = time.perf_counter()
                rec["eval"] = server.evaluate(state)
                rec.setdefault("timings", {})["eval"] = time.perf_counter() - t_eval
            history.append(output.end_round(rnd, rec, state, engine, t_round))  # the metrics line follows its checkpoint
            bar.advance(rounds_task)
    return output.finish(server.summary(history), lambda folder: server.write_global_adapters(state, folder))


class GlobalModel:
    """The base model as the server holds it: W0 plus what the run merged into it, evaluated with the
    global adapter, written out as adapters; and what the run trains, said before round 1."""

    def __init__(self, cfg: RunConfig, engine: RoundEngine, trainer: LocalTrainer, clients: list[ClientData], progress: bool = True,
                 base_evals: BaseEvaluations | None = None) -> None:
        self.cfg = cfg
        self.base_evals = base_evals  # round-0 evaluations of the base model shared with other runs (compare)
        self.engine = engine
        self.trainer = trainer  # the model is the trainer's: evaluation attaches adapters with it
        self.clients = clients
        self.progress = progress
        self.algorithm = get_algorithm(cfg.federation.algorithm)
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
    def model(self):
        return self.trainer.model

    @property
    def tokenizer(self):
        return self.trainer.tokenizer

    @property
    def fed(self) -> Federation:
        return self.engine.fed

    @property
    def method(self) -> AggregationMethod:
        return self.engine.method

    @property
    def server_dtype(self) -> torch.dtype:
        return self.engine.server_dtype

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
        device = model_device(self.model)
        scoring = f", scoring {pass_precision(self.cfg.eval, device, 'scoring')}" if self.cfg.eval.eval_loss or self.cfg.eval.teacher_forced else ""
        lines.append(f"precision: training {explain_precision(self.cfg.train.precision, device)}; evaluation: generation {pass_precision(self.cfg.eval, device, 'generation')}{scoring}")
        note = self.eval_note()
        if note:
            lines.append(f"nothing will be evaluated (Rouge-L stays empty): {note}")
        return lines

    # -- the weights and evaluation --------------------------------------------------------------------
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

    def set_base_weights(self, extra: dict[str, Tensor] | None = None) -> None:
        """W = W0 + everything merged into the base weights (+ ``extra``) for every target layer."""
        deltas = dict(self.engine.merged)
        for name, d in (extra or {}).items():
            deltas[name] = deltas[name].to(d.device) + d if name in deltas else d
        apply_dense_delta(self.model, deltas, self.originals)

    def evaluate(self, state: ServerState) -> dict[str, Any]:
        ecfg = self.cfg.eval
        if self.evaluate_as_adapter:
            return self._evaluate_as_adapter(state, ecfg)
        self.set_base_weights(self.adapter_deltas(state))
        try:
            result = evaluate_clients(self.model, self.tokenizer, self.fed.eval_clients, ecfg, progress=self.progress)
        finally:
            self.set_base_weights()
        return result.to_dict()

    def evaluate_start(self, state: ServerState) -> dict[str, Any]:
        """Round 0's evaluation. Before any update (an empty state, nothing merged) it scores the base
        model itself; with ``base_evals`` a run whose model, held-out examples and eval settings match
        an earlier run's (:func:`flexlora.base_eval.evaluation_key`) takes that run's record instead of
        scoring the same thing again (``shared_from`` names the run)."""
        if self.base_evals is None or self.engine.merged or any(gm.rank for gm in state.adapter.values()):
            return self.evaluate(state)
        ecfg = self.cfg.eval
        key = evaluation_key(model_digest(self.model, self.tokenizer), model_device(self.model), self.fed.eval_clients, ecfg)
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
        return result.to_dict()

    def restore_base(self) -> None:
        """Put the original base weights back (the model may serve another run next)."""
        apply_dense_delta(self.model, {}, self.originals)

    def privacy_summary(self, rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
        pv = self.cfg.privacy
        if not pv.clips:
            return None
        spent = self.engine.privacy_spent(rounds[-1]["round"] if rounds else 0) or {}  # the rounds that ran (a stopped run: fewer)
        clipped = sum(h.get("privacy", {}).get("clipped", 0) for h in rounds)
        seen = sum(h.get("privacy", {}).get("of", 0) for h in rounds)
        return {"clip_norm": pv.clip_norm, "noise_multiplier": pv.noise_multiplier, "clipped_updates": clipped, "updates": seen, **spent}

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """``summary.json`` of the run whose metrics lines are ``history`` (``final_adapters`` is added by
        :meth:`flexlora.output.RunOutput.finish`)."""
        evals = [h for h in history if "eval" in h]
        last = evals[-1]["eval"] if evals else None
        first = evals[0]["eval"] if evals and evals[0]["round"] == 0 else None
        rounds = [h for h in history if h.get("round", 0) > 0]
        return {
            "name": self.cfg.name,
            "aggregation": self.method.name,
            "algorithm": self.cfg.federation.algorithm,
            "distribution": ("custom" if self.cfg.resources.custom_distribution else self.cfg.resources.distribution) if self.cfg.resources.mode == "types" else "budget",
            "custom_distribution": dict(self.cfg.resources.custom_distribution) or None,
            "rounds": self.cfg.federation.rounds,
            "train_clients": len(self.fed.train_clients),
            "eval_clients": len(self.fed.eval_clients),
            "eval_note": self.eval_note(),
            "type_counts": counts(self.fed.types.values()),
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
            "privacy": self.privacy_summary(rounds),
        }

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


def counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def aggregation_spectra(state: ServerState) -> dict[str, dict]:
    """Spectrum summaries of an SVD-ordered state (no client updates to compare against)."""
    return {n: spectrum_summary(gm.spectrum, []) for n, gm in state.adapter.items() if gm.spectrum is not None}
