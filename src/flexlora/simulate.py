"""The in-process federated simulator: sample, train, validate, aggregate, evaluate, checkpoint.

One base model serves every client in turn (see :mod:`flexlora.train`), so thousands of clients
cost no more memory than sixteen. Everything random is derived from the run seed and the round
number (client sampling, failures, local shuffling and dropout), which makes a resumed run
produce the same numbers as an uninterrupted one: the checkpoint holds only the server state,
the clients' persistent state and, for FLoRA, the update merged into the base weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from flexlora.checkpoint import load_checkpoint, save_checkpoint, state_from_dict, state_to_dict
from flexlora.config import ConfigError, RunConfig
from flexlora.data.types import ClientData
from flexlora.diagnostics import spectrum_summary, summarise
from flexlora.evaluate import EvalConfig, evaluate_clients
from flexlora.fsutil import atomic_write_text
from flexlora.methods import AggregationMethod, get_method
from flexlora.models import is_quantized, load_model, resolve_device, resolve_dtype, resolve_model_dtype
from flexlora.peft_io import write_adapter
from flexlora.resources import target_module_names
from flexlora.rounds import (
    ClientStatus,
    Federation,
    PlannedClient,
    RoundEngine,
    RoundOutcome,
    build_federation,
    derived_seed,
    factor_bytes,
    mean,
    metrics_entry,
    rank_summary,
)
from flexlora.train import ClientOutOfMemory, LocalTrainer, apply_dense_delta, sparse_mask, train_client_sparse
from flexlora.update import ClientUpdate, GlobalModule, LoraFactors, ModuleSpec, ServerState

METRICS = "metrics.jsonl"
RoundFn = Callable[[int, ServerState, Any], "tuple[dict[str, Any], ServerState]"]


def load_clients(cfg: RunConfig) -> list[ClientData]:
    d = cfg.data
    if d.kind == "suite":
        from flexlora.data.suite import make_suite

        clients = make_suite(d.suite_clients, d.suite_examples, d.suite_eval, seed=cfg.federation.seed)
    elif d.kind == "ni":
        from flexlora.data.ni import load_ni

        clients = load_ni(
            d.path, heldout_file=d.heldout_file, max_train_per_client=d.max_train_per_client, max_eval_per_client=d.max_eval_per_client, on_error=d.on_error
        )
    else:
        from flexlora.data.instruct import load_instruct, partition_by_category, partition_dirichlet

        records = load_instruct(d.path, on_error=d.on_error)
        if d.partition == "category":
            clients = partition_by_category(records, eval_fraction=d.eval_fraction, seed=cfg.federation.seed)
        else:
            clients = partition_dirichlet(records, d.num_clients, d.dirichlet_alpha, cfg.federation.seed, eval_fraction=d.eval_fraction)
    return clients


class Simulation:
    """A federated run in one process. ``run()`` is resumable at round granularity."""

    def __init__(self, cfg: RunConfig, out: Path, model=None, tokenizer=None, clients: list[ClientData] | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        if model is None:
            model, tokenizer = load_model(cfg.model)
        self.model, self.tokenizer = model, tokenizer
        self.clients = clients if clients is not None else load_clients(cfg)
        self.server_dtype = resolve_dtype(cfg.federation.server_dtype)
        self.method = self._method()
        self.engine = RoundEngine(cfg, build_federation(cfg, self.clients, target_module_names(self.model, cfg.lora.targets)), self.method, self.server_dtype)
        self.method.check_specs(list(self.fed.specs.values()))
        self.trainer = LocalTrainer(self.model, self.tokenizer, cfg.lora.targets, self.method.local_training(cfg.train), self.method.local_penalty(cfg.train))
        # original weights of every target layer: evaluation and FLoRA merges set W = W0 + delta exactly
        # (a quantised base is never merged into: its evaluation attaches the global update as an adapter)
        self.quantized = is_quantized(self.model)
        self.originals = {} if self.quantized else {n: self.model.get_submodule(n).weight.detach().clone() for n in self.fed.shapes}

    # -- the engine's state, seen from the runner ------------------------------------------------------
    @property
    def fed(self) -> Federation:
        return self.engine.fed

    @property
    def merged(self) -> dict[str, Tensor]:
        """The cumulative update merged into the base weights (FLoRA, SLoRA stage 1)."""
        return self.engine.merged

    @merged.setter
    def merged(self, value: dict[str, Tensor]) -> None:
        self.engine.merged = value

    @property
    def client_state(self) -> dict[str, Any]:
        return self.engine.client_state

    @client_state.setter
    def client_state(self, value: dict[str, Any]) -> None:
        self.engine.client_state = value

    def _method(self) -> AggregationMethod:
        fed = self.cfg.federation
        device = resolve_device(fed.server_device, "federation.server_device")
        return get_method(fed.aggregation, dtype=self.server_dtype, seed=fed.seed, device=device, **dict(fed.method_options))

    def sample(self, rnd: int) -> list[ClientData]:
        return self.engine.sample(rnd)

    def spec_for(self, client: ClientData, rnd: int, budget_mib: float | None = None) -> dict[str, ModuleSpec]:
        return self.engine.spec_for(client, rnd, budget_mib)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False, round_fn: RoundFn | None = None) -> dict[str, Any]:
        """Run (or resume) every round. ``round_fn(round, state, bar) -> (record, state)`` replaces
        the in-process round (the Flower ServerApp passes one that trains on remote nodes)."""
        cfg = self.cfg
        round_fn = round_fn or self.run_round
        self.out.mkdir(parents=True, exist_ok=True)
        fingerprint = config_fingerprint(cfg)
        start_round = 1
        state = self.method.initial_state(self.fed.shapes)
        history: list[dict[str, Any]] = []
        ckpt = load_checkpoint(self.out) if resume else None
        if ckpt is not None:
            if ckpt["fingerprint"] != fingerprint:
                saved = ckpt.get("config") or _saved_config(self.out)
                changed = config_changes(saved, cfg) if saved is not None else ["(the checkpoint's config is not saved beside it)"]
                if changed:
                    raise ConfigError(
                        f"{self.out}: the checkpoint was made with a different config ({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
                        "resume with the same config or use a new --out"
                    )
            state = state_from_dict(ckpt["state"])
            self.merged = ckpt["merged"]
            self.client_state = ckpt["client_state"]
            start_round = ckpt["round"] + 1
            history = read_metrics(self.out / METRICS, upto=ckpt["round"])
            if ckpt.get("record") and (not history or history[-1].get("round", 0) < ckpt["round"]):
                history.append(ckpt["record"])  # killed between the checkpoint and its metrics line
        elif resume is False and (self.out / METRICS).exists():
            (self.out / METRICS).unlink()
        _write_metrics(self.out / METRICS, history)
        atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
        self._set_base_weights()

        if start_round == 1 and cfg.eval.at_start and self.fed.eval_clients:
            rec = {"round": 0, "eval": self.evaluate(state)}
            history.append(rec)
            _append(self.out / METRICS, rec)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, disable=not self.progress, transient=False) as bar:
            rounds_task = bar.add_task(f"{cfg.name}: rounds", total=cfg.federation.rounds, completed=start_round - 1)
            for rnd in range(start_round, cfg.federation.rounds + 1):
                t_round = time.perf_counter()
                if self.is_sparse_round(rnd):
                    rec = self.run_sparse_round(rnd, bar)
                    if rnd == cfg.federation.slora_rounds:
                        state = self.slora_transition(rnd)
                        rec["slora_transition"] = summarise(aggregation_spectra(state))
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
                save_checkpoint(
                    self.out,
                    {
                        "round": rnd,
                        "fingerprint": fingerprint,
                        "config": cfg.to_dict(),
                        "state": state_to_dict(state),
                        "merged": self.merged,
                        "client_state": self.client_state,
                        "record": rec,
                    },
                )
                rec["timings"]["checkpoint"] = time.perf_counter() - t_ckpt
                rec["timings"]["round"] = time.perf_counter() - t_round  # everything above, wall clock
                history.append(rec)
                _append(self.out / METRICS, rec)
                bar.advance(rounds_task)
        summary = self.finish(state, history)
        return summary

    def run_round(self, rnd: int, state: ServerState, bar=None) -> tuple[dict[str, Any], ServerState]:
        """One round in this process: the engine plans it, the local trainer trains every client in
        turn (with the configured failures injected), the engine closes it."""
        plan = self.engine.plan(rnd, state)
        fail_rng = random.Random(derived_seed(self.cfg.federation.seed, "failures", rnd))
        outcome = RoundOutcome(updates=[], entries=[], dropped={}, bytes_up=0, train_seconds=0.0)
        task = bar.add_task(f"round {rnd}: clients", total=len(plan.clients)) if bar is not None else None
        for planned in plan.clients:
            update = self._train_planned(rnd, planned, fail_rng, outcome)
            if update is not None:
                outcome.updates.append(update)
                outcome.bytes_up += factor_bytes(update.modules.values())
            outcome.entries.append(planned.entry)
            if bar is not None:
                bar.advance(task)
        if bar is not None:
            bar.remove_task(task)
        outcome.train_seconds = time.perf_counter() - plan.started
        rec, new_state = self.engine.close(plan, state, outcome)
        if new_state.base_delta is not None:
            self._set_base_weights()  # the merged update is part of everybody's base weights from now on
        return rec, new_state

    def _train_planned(self, rnd: int, planned: PlannedClient, fail_rng: random.Random, outcome: RoundOutcome) -> ClientUpdate | None:
        """One client's local training; its status goes into its record line, a failure into ``outcome.dropped``."""
        cid, entry = planned.cid, planned.entry
        failure = _draw_failure(fail_rng, self.cfg.failures)
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
        return _garbage(result.update, fail_rng) if failure == "garbage" else result.update

    # -- SLoRA ----------------------------------------------------------------------------------------
    def is_sparse_round(self, rnd: int) -> bool:
        return self.cfg.federation.algorithm == "slora" and rnd <= self.cfg.federation.slora_rounds

    def sparse_masks(self, client: ClientData, spec: dict[str, ModuleSpec]) -> dict[str, Tensor]:
        """SLoRA stage 1: a fixed random mask per client and module, with as many entries as the
        client's LoRA at that module has parameters (its resource type sets the density)."""
        masks = {}
        for name, (d_out, d_in) in self.fed.shapes.items():
            density = min(1.0, spec[name].rank * (d_in + d_out) / (d_in * d_out))
            masks[name] = sparse_mask((d_out, d_in), density, derived_seed(self.cfg.federation.seed, "mask", client.client_id, name))
        return masks

    def run_sparse_round(self, rnd: int, bar=None) -> dict[str, Any]:
        """FedAvg of the clients' sparse full-weight updates, merged into the base weights."""
        cfg = self.cfg
        t0 = time.perf_counter()
        train_cfg = dataclasses.replace(cfg.train, lr=cfg.federation.slora_lr)
        fail_rng = random.Random(derived_seed(cfg.federation.seed, "failures", rnd))
        acc = {n: torch.zeros(s, dtype=self.server_dtype) for n, s in self.fed.shapes.items()}
        total_n, clients_log, dropped, bytes_up = 0, [], {}, 0
        nnz_global = sum(int((d != 0).sum()) for d in self.merged.values())
        selected = self.sample(rnd)
        for client in selected:
            cid = str(client.client_id)
            spec = self.spec_for(client, rnd)
            entry: dict[str, Any] = {"id": client.client_id, "type": self.fed.types.get(client.client_id), "n": client.num_examples, "ranks": rank_summary(spec)}
            failure = _draw_failure(fail_rng, cfg.failures)
            if failure in ("crash", "straggle"):
                dropped[cid] = ["crashed during local training" if failure == "crash" else "missed the round timeout"]
                clients_log.append({**entry, "status": ClientStatus(failure)})
                continue
            masks = self.sparse_masks(client, spec)
            res = train_client_sparse(self.model, self.tokenizer, client, masks, train_cfg, derived_seed(cfg.federation.seed, "train", rnd, client.client_id))
            if failure == "garbage":
                res.deltas[sorted(res.deltas)[0]][0, 0] = float("nan")
            if not all(bool(torch.isfinite(d).all()) for d in res.deltas.values()):
                dropped[cid] = ["sparse update contains NaN or Inf"]
                clients_log.append({**entry, "status": ClientStatus.REJECTED})
                continue
            for name, d in res.deltas.items():
                acc[name] += client.num_examples * d.to(self.server_dtype)
            total_n += client.num_examples
            bytes_up += res.nnz * 8  # value + int32 index
            clients_log.append({**entry, "status": ClientStatus.OK, "density": res.nnz / sum(m.numel() for m in masks.values()), **{k: v for k, v in res.metrics.items()}})
        rec: dict[str, Any] = {"round": rnd, "stage": "slora-sparse", "clients": clients_log, "dropped": dropped, "bytes_up": bytes_up, "bytes_down": nnz_global * 8 * len(selected)}
        ok = [e for e in clients_log if e.get("status") == ClientStatus.OK]
        if len(ok) < max(1, cfg.federation.min_clients):
            rec["skipped"] = f"only {len(ok)} valid updates, fewer than min_clients={cfg.federation.min_clients}; global state unchanged"
            return rec
        for name, a in acc.items():
            d = a / total_n
            self.merged[name] = self.merged[name] + d if name in self.merged else d
        self._set_base_weights()
        rec["train_loss"] = mean([e["loss_mean"] for e in ok])
        rec["tokens"] = sum(e["tokens"] for e in ok)
        rec["timings"] = {"train": time.perf_counter() - t0}
        return rec

    def slora_transition(self, rnd: int) -> ServerState:
        """End of stage 1: the base weights go back to the original ones and the accumulated sparse
        update becomes the LoRA initialisation, SVD-ordered so every client's share is its best
        rank-r approximation (whatever aggregation stage 2 uses)."""
        adapter = {}
        for name, delta in self.merged.items():
            U, S, Vh = torch.linalg.svd(delta.to(self.server_dtype), full_matrices=False)
            adapter[name] = GlobalModule(A=Vh.contiguous(), B=(U * S).contiguous(), spectrum=S)
        self.stage1_delta = self.merged
        self.merged = {}
        self._set_base_weights()
        return ServerState(method=self.method.name, round=rnd, adapter=adapter, info={"seed": self.cfg.federation.seed, "slora_init": True})

    # -- evaluation and outputs --------------------------------------------------------------------
    def adapter_deltas(self, state: ServerState) -> dict[str, Tensor]:
        """The global adapter's dense update per module (empty for FLoRA, whose update is merged)."""
        if state.base_delta is not None:
            return {}
        return {name: gm.delta(self.server_dtype) for name, gm in state.adapter.items() if gm.rank}

    def global_deltas(self, state: ServerState) -> dict[str, Tensor]:
        """Everything the global model adds to the original base weights."""
        deltas = {n: d.clone() for n, d in self.merged.items()}
        for name, d in self.adapter_deltas(state).items():
            deltas[name] = deltas[name] + d if name in deltas else d
        return deltas

    def _set_base_weights(self, extra: dict[str, Tensor] | None = None) -> None:
        deltas = dict(self.merged)
        for name, d in (extra or {}).items():
            deltas[name] = deltas[name] + d if name in deltas else d
        apply_dense_delta(self.model, deltas, self.originals)

    def evaluate(self, state: ServerState) -> dict[str, Any]:
        cfg = self.cfg.eval
        ecfg = EvalConfig(**{k: getattr(cfg, k) for k in EvalConfig.__dataclass_fields__})
        if self.quantized:
            return self._evaluate_as_adapter(state, ecfg)
        self._set_base_weights(self.adapter_deltas(state))
        try:
            result = evaluate_clients(self.model, self.tokenizer, self.fed.eval_clients, ecfg, progress=self.progress)
        finally:
            self._set_base_weights()
        return result.to_dict()

    def _evaluate_as_adapter(self, state: ServerState, ecfg: EvalConfig) -> dict[str, Any]:
        """A quantised base cannot take ``W0 + delta``: the global update is attached as a LoRA
        adapter at its own rank with scale 1 (``B @ A`` exactly), evaluated, and removed."""
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

    def finish(self, state: ServerState, history: list[dict[str, Any]]) -> dict[str, Any]:
        final = self.out / "final"
        self.write_global_adapters(state, final)
        evals = [h for h in history if "eval" in h]
        last = evals[-1]["eval"] if evals else None
        first = evals[0]["eval"] if evals and evals[0]["round"] == 0 else None
        rounds = [h for h in history if h.get("round", 0) > 0]
        summary = {
            "name": self.cfg.name,
            "aggregation": self.method.name,
            "algorithm": self.cfg.federation.algorithm,
            "distribution": self.cfg.resources.distribution if self.cfg.resources.mode == "types" else "budget",
            "rounds": self.cfg.federation.rounds,
            "train_clients": len(self.fed.train_clients),
            "eval_clients": len(self.fed.eval_clients),
            "type_counts": _counts(self.fed.types.values()),
            "rank_notes": self.fed.notes,
            "tokens": sum(h.get("tokens", 0) for h in rounds),
            "train_seconds": sum(h.get("timings", {}).get("train", 0.0) for h in rounds),
            "final_train_loss": rounds[-1].get("train_loss") if rounds else None,
            "rouge_l_weighted": last["rouge_l_weighted"] if last else None,
            "rouge_l_mean": last["rouge_l_mean"] if last else None,
            "base_rouge_l_weighted": first["rouge_l_weighted"] if first else None,
            "proxy_eval_loss": last.get("proxy_eval_loss") if last else None,
            "dropped_updates": sum(len(h.get("dropped", {})) for h in rounds),
            "skipped_rounds": [h["round"] for h in rounds if "skipped" in h],
            "final_adapters": str(final),
        }
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        return summary

    def write_global_adapters(self, state: ServerState, folder: Path) -> None:
        """``global/``: the exact global update (base-weight merges included) as a PEFT adapter at
        full rank with scale 1; ``<type>/``: the share a client of each resource type receives."""
        deltas = self.global_deltas(state)
        factors, specs = {}, {}
        for name, d in deltas.items():
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            k = max(1, int((S > S.max() * 1e-12).sum())) if S.numel() else 1
            factors[name] = LoraFactors(A=Vh[:k].float(), B=(U[:, :k] * S[:k]).float(), scale=1.0)
            specs[name] = ModuleSpec(rank=k, alpha=float(k))
        template = {"base_model_name_or_path": str(self.cfg.model.source), "lora_dropout": self.cfg.train.lora_dropout}
        if factors:
            write_adapter(folder / "global", factors, specs, template=template)
        if state.base_delta is None and self.cfg.resources.mode == "types":
            seen = {}
            for cid, t in sorted(self.fed.types.items()):
                seen.setdefault(t, self.fed.specs[cid])
            for t, spec in seen.items():
                share = self.method.share_for(state, spec)
                write_adapter(folder / t, {n: LoraFactors(f.A.float(), f.B.float(), f.scale) for n, f in share.items()}, spec, template=template)


# -- helpers ----------------------------------------------------------------------------------------
def config_fingerprint(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    d.pop("name", None)
    d.pop("compare", None)
    d["eval"] = {k: v for k, v in d["eval"].items()}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("types", "custom_distribution", "method_options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


RUNS_ANYWHERE = ("model.device", "federation.server_device")  # a run moves between devices: not a config change


def config_changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The config keys that make a checkpoint unusable for ``cfg``: values that differ, except options
    the checkpoint's config does not know yet (added to flexlora since) that are at their default,
    which by construction change nothing. ``name`` and ``compare`` never matter."""
    def plain(d: dict[str, Any]) -> dict[str, Any]:  # as config.json stores it: JSON types, flat dotted keys
        return _flatten(json.loads(json.dumps(d, default=str)))

    old, new, default = plain(saved), plain(cfg.to_dict()), plain(RunConfig().to_dict())
    here = str(resolve_model_dtype("auto", resolve_device(cfg.model.device))).removeprefix("torch.")
    for d in (old, new, default):  # "auto" means what it resolves to on this machine
        if d.get("model.dtype") == "auto":
            d["model.dtype"] = here
    changed = []
    for key in sorted(set(old) | set(new)):
        if key == "name" or key.startswith("compare") or key in RUNS_ANYWHERE:
            continue
        if key not in old:
            if new[key] != default.get(key):
                changed.append(f"{key} = {new[key]!r} is new")
        elif key not in new:
            changed.append(f"{key} no longer exists")
        elif old[key] != new[key]:
            changed.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changed


def _saved_config(out: Path) -> dict[str, Any] | None:
    """A checkpoint written before checkpoints carried their config: the run's config.json."""
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None


def aggregation_spectra(state: ServerState) -> dict[str, dict]:
    """Spectrum summaries of an SVD-ordered state (no client updates to compare against)."""
    return {n: spectrum_summary(gm.spectrum, []) for n, gm in state.adapter.items() if gm.spectrum is not None}


def _draw_failure(rng: random.Random, f) -> str | None:
    x = rng.random()
    if x < f.crash:
        return "crash"
    if x < f.crash + f.garbage:
        return "garbage"
    if x < f.crash + f.garbage + f.straggle:
        return "straggle"
    return None


def _garbage(update: ClientUpdate, rng: random.Random) -> ClientUpdate:
    """A hostile or broken client: NaN, a wrong shape, or an absurd norm."""
    kind = rng.choice(["nan", "shape", "norm"])
    modules = dict(update.modules)
    name = sorted(modules)[rng.randrange(len(modules))]
    f = modules[name]
    if kind == "nan":
        A = f.A.clone()
        A[0, 0] = float("nan")
        modules[name] = LoraFactors(A, f.B, f.scale)
    elif kind == "shape":
        modules[name] = LoraFactors(torch.zeros(f.rank, f.d_in + 1), f.B, f.scale)
    else:
        modules = {n: LoraFactors(g.A * 1e4, g.B * 1e4, g.scale) for n, g in modules.items()}
    return ClientUpdate(update.client_id, update.num_examples, modules, {**update.meta, "garbage": kind})


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
