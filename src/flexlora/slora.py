"""SLoRA (Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
2023), the whole algorithm: the first ``federation.slora_rounds`` rounds train sparse full-weight
updates (a fixed random mask per client whose density matches its LoRA's parameter count), FedAvg
them into the base weights, and at the end of the stage the accumulated update becomes the LoRA
initialisation through its SVD, so every client's share is its best rank-r approximation. LoRA
rounds follow, with any aggregation method that does not restart LoRA every round.

The warm-up's rounds run through the round engine (:class:`flexlora.rounds.RoundEngine`): its
sampling and ranks (the plan), failure injection (:mod:`flexlora.failures`), the screen (shapes and
finiteness of every update, then the median norm screen), ``min_clients``, the close step and the
:class:`~flexlora.rounds.RoundRecord`. Only the aggregation is the stage's own: a FedAvg of dense
updates merged into the base weights. ``federation.algorithm = "slora"`` switches it on
(:mod:`flexlora.algorithms`).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor

from flexlora.config import TrainConfig
from flexlora.data.types import ClientData
from flexlora.failures import client_failure, garbage_deltas
from flexlora.models import is_low_precision, model_device, weight_is_transposed
from flexlora.precision import resolve_precision
from flexlora.rounds import ClientStatus, RoundEngine, RoundRecord, close_step, mean
from flexlora.seeds import derived_seed
from flexlora.train import (
    OUT_OF_MEMORY,
    ClientOutOfMemory,
    hold_in_float32,
    release_accelerator_memory,
    tokenize_client,
    train_steps,
)
from flexlora.update import GlobalModule, ModuleSpec, ServerState, all_finite
from flexlora.validate import ValidationConfig, norm_verdicts

if TYPE_CHECKING:  # pragma: no cover
    from flexlora.rounds import PlannedClient
    from flexlora.train import LocalTrainer

STAGE = "slora-sparse"


# -- the client's side: masks and sparse training -----------------------------------------------------
@dataclass
class SparseResult:
    """Stage 1 of SLoRA: a client's masked full-weight update (dense tensors, zero off the mask)."""

    client_id: str
    num_examples: int
    deltas: dict[str, Tensor]
    nnz: int
    metrics: dict[str, Any] = field(default_factory=dict)


def sparse_mask(shape: tuple[int, int], density: float, seed: int) -> Tensor:
    """A fixed random mask with the given density (SLoRA's per-client sparse pattern)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def sparse_masks(shapes: Mapping[str, tuple[int, int]], spec: Mapping[str, ModuleSpec], seed: int, client_id: int) -> dict[str, Tensor]:
    """A client's fixed random mask per module, with as many entries as the client's LoRA at that
    module has parameters (its resource type sets the density), seeded by (run seed, client, module)."""
    masks = {}
    for name, (d_out, d_in) in shapes.items():
        density = min(1.0, spec[name].rank * (d_in + d_out) / (d_in * d_out))
        masks[name] = sparse_mask((d_out, d_in), density, derived_seed(seed, "mask", client_id, name))
    return masks



def train_client_sparse(model, tokenizer, client: ClientData, masks: Mapping[str, Tensor], cfg: TrainConfig, seed: int) -> SparseResult:
    """SLoRA stage 1 (Babakniya et al. 2023): train only the masked entries of the target weights.

    The gradient of every target weight is multiplied by its mask, so AdamW (no weight decay)
    never moves an entry outside it; the update is ``W_after - W_before`` and the weights are
    restored afterwards, leaving the shared base model as it was. The trained weights are float32
    masters whatever the model's dtype: an AdamW step of ~lr (5e-5) is below bfloat16's spacing for
    any ``|w|`` above ~0.016, so in bfloat16 most steps would round away. Running out of
    accelerator memory raises :class:`ClientOutOfMemory` with the weights restored.
    """
    try:
        return train_masked(model, tokenizer, client, masks, cfg, seed)
    except OUT_OF_MEMORY as e:
        message = str(e).splitlines()[0] if str(e) else "out of memory"
    release_accelerator_memory()
    raise ClientOutOfMemory(f"client {client.client_id} ran out of accelerator memory ({message})")


def train_masked(model, tokenizer, client: ClientData, masks: Mapping[str, Tensor], cfg: TrainConfig, seed: int) -> SparseResult:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = tokenize_client(tokenizer, client, cfg)
    if not data:
        raise ValueError(f"client {client.client_id} has no training examples")
    held_here = [name for name in masks if is_low_precision(model.get_submodule(name).weight.dtype)]
    for name in held_here:
        hold_in_float32(model.get_submodule(name), True)
    weights = {name: model.get_submodule(name).weight for name in masks}
    before = {name: w.detach().clone() for name, w in weights.items()}
    hooks = []
    device = model_device(model)
    # masks are (d_out, d_in) like every update; a Conv1D weight is stored transposed
    device_masks = {name: (masks[name].T if weight_is_transposed(model.get_submodule(name)) else masks[name]).to(device) for name in masks}
    for name, w in weights.items():
        w.requires_grad_(True)
        mask = device_masks[name].to(w.dtype)
        hooks.append(w.register_hook(lambda g, m=mask: g * m))
    try:
        params = list(weights.values())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0) if cfg.optimizer == "adamw" else torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        model.train()
        losses, tokens, _ = train_steps(model, data, tokenizer.pad_token_id, cfg, rng, device, params, opt)
        model.eval()
        deltas = {name: ((w.detach() - before[name]) * device_masks[name]).to("cpu", torch.float32) for name, w in weights.items()}
        deltas = {name: (d.T.contiguous() if weight_is_transposed(model.get_submodule(name)) else d) for name, d in deltas.items()}
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, w in weights.items():
                w.requires_grad_(False)
                w.copy_(before[name])
        for name in held_here:
            hold_in_float32(model.get_submodule(name), False)
    seconds = time.perf_counter() - t0
    nnz = sum(int(m.sum()) for m in masks.values())
    metrics = {"loss_first": losses[0], "loss_last": losses[-1], "loss_mean": sum(losses) / len(losses), "steps": len(losses), "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds if seconds else 0.0, "precision": resolve_precision(cfg.precision, device)}
    return SparseResult(str(client.client_id), client.num_examples, deltas, nnz, metrics)


# -- the server's side: the stage's rounds --------------------------------------------------------------
class SparseWarmup:
    """SLoRA's stage 1 as rounds of ``engine``; the runner sets the base weights (``engine.merged``
    holds the stage's update) after every round and at the transition."""

    def __init__(self, engine: RoundEngine, trainer: "LocalTrainer") -> None:
        self.engine = engine
        self.trainer = trainer  # its base model and tokenizer (the LoRA rounds' trainer: one model in memory)
        self.cfg = engine.cfg
        self.stage1_delta: dict[str, Tensor] = {}  # the whole stage's update, kept at the transition

    def covers(self, rnd: int) -> bool:
        return rnd <= self.cfg.federation.slora_rounds

    def is_last(self, rnd: int) -> bool:
        return rnd == self.cfg.federation.slora_rounds

    def masks(self, client: ClientData, spec: Mapping[str, ModuleSpec]) -> dict[str, Tensor]:
        return sparse_masks(self.engine.fed.shapes, spec, self.cfg.federation.seed, client.client_id)

    def run_round(self, rnd: int, state: ServerState, bar=None) -> RoundRecord:
        """FedAvg of the clients' sparse full-weight updates, merged into ``engine.merged``."""
        cfg, engine = self.cfg, self.engine
        fed = engine.fed
        plan = engine.plan(rnd, state, shares=False)  # who, at which ranks (the masks' densities), their record lines
        train_cfg = dataclasses.replace(cfg.train, lr=cfg.federation.slora_lr)
        nnz_global = sum(int((d != 0).sum()) for d in engine.merged.values())
        fold = DenseFold(fed.shapes, engine.server_dtype, ValidationConfig(norm_factor=cfg.failures.norm_factor), [p.cid for p in plan.clients])
        dropped: dict[str, list[str]] = {}
        bytes_up = 0
        task = bar.add_task(f"round {rnd}: clients (sparse)", total=len(plan.clients)) if bar is not None else None
        for planned in plan.clients:
            result = self.train_planned(rnd, planned, train_cfg, dropped)
            if result is None:
                fold.absent(planned.cid)
            else:
                bytes_up += result.nnz * 8  # value + int32 index
                fold.add(planned.cid, planned.client.num_examples, result.deltas)
            if bar is not None:
                bar.advance(task)
        if bar is not None:
            bar.remove_task(task)
        verdict = fold.settle()
        for cid, reasons in verdict[1].items():
            dropped[cid] = reasons
            next(p.entry for p in plan.clients if p.cid == cid)["status"] = ClientStatus.REJECTED
        entries = [p.entry for p in plan.clients]
        rec = RoundRecord(rnd, entries, dropped, bytes_up, nnz_global * 8 * len(plan.clients), timings={}, stage=STAGE)
        closing = close_step(verdict, engine.min_updates(), fold.mean, engine.too_few, "slora")
        if closing.state is None:
            rec.skipped = closing.skipped
            return rec
        for name, d in closing.state.items():
            engine.merged[name] = engine.merged[name] + d if name in engine.merged else d
        ok = [e for e in entries if e.get("status") == ClientStatus.OK]
        rec.train_loss = mean([e["loss_mean"] for e in ok])
        rec.tokens = sum(e["tokens"] for e in ok)
        rec.timings = {"train": time.perf_counter() - plan.started}
        return rec

    def train_planned(self, rnd: int, planned: "PlannedClient", train_cfg: TrainConfig, dropped: dict[str, list[str]]) -> SparseResult | None:
        """One client's sparse training, with the configured failures injected; its status goes into its record line."""
        cid, entry = planned.cid, planned.entry
        failure, fail_rng = client_failure(self.cfg.federation.seed, self.cfg.failures, rnd, planned.client.client_id)
        if failure in ("crash", "straggle"):
            dropped[cid] = ["crashed during local training" if failure == "crash" else "missed the round timeout"]
            entry["status"] = ClientStatus(failure)
            return None
        masks = self.masks(planned.client, planned.spec)
        try:
            res = train_client_sparse(self.trainer.model, self.trainer.tokenizer, planned.client, masks, train_cfg, self.engine.train_seed(rnd, planned.client.client_id))
        except ClientOutOfMemory as e:  # that client's failure: weights restored, memory released
            dropped[cid] = [str(e)]
            entry["status"] = ClientStatus.OOM
            return None
        if failure == "garbage":
            res.deltas = garbage_deltas(res.deltas, fail_rng)
        entry.update(status=ClientStatus.OK, density=res.nnz / sum(m.numel() for m in masks.values()), **res.metrics)
        return res

    def transition(self, rnd: int) -> ServerState:
        """End of stage 1: the accumulated sparse update becomes the LoRA initialisation, SVD-ordered
        so every client's share is its best rank-r approximation (whatever aggregation stage 2 uses);
        ``engine.merged`` is emptied (the runner puts the original base weights back)."""
        engine = self.engine
        adapter = {}
        for name, delta in engine.merged.items():
            U, S, Vh = torch.linalg.svd(delta.to(engine.server_dtype), full_matrices=False)
            adapter[name] = GlobalModule(A=Vh.contiguous(), B=(U * S).contiguous(), spectrum=S)
        self.stage1_delta = engine.merged
        engine.merged = {}
        return ServerState(method=engine.method.name, round=rnd, adapter=adapter, info={"seed": self.cfg.federation.seed, "slora_init": True})


class DenseFold:
    """The stage's screen and FedAvg of dense updates, folded in the order of the plan as soon as the
    median norm screen can no longer reject them (as :class:`flexlora.fold.RoundFold` does for LoRA
    factors): an update the screen could still reject waits in a temporary file, so the server holds
    one dense accumulator, and the sum is taken in the plan's order whatever the screen holds back."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, config: ValidationConfig, expected: list[str]) -> None:
        self.shapes, self.dtype, self.config = shapes, dtype, config
        self.order = list(expected)
        self.waiting = set(expected)
        self.acc = {n: torch.zeros(s, dtype=dtype) for n, s in shapes.items()}
        self.total_n = 0
        self.norms: dict[str, float] = {}
        self.rejected: dict[str, list[str]] = {}
        self.pending: list[tuple[str, int, Callable[[], dict[str, Tensor]]]] = []  # screened, in plan order, not folded yet
        self.folder: Path | None = None

    def add(self, cid: str, n: int, deltas: dict[str, Tensor]) -> None:
        self.waiting.discard(cid)
        problems = dense_problems(deltas, self.shapes)
        if problems:
            self.rejected[cid] = problems
        else:
            self.norms[cid] = float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas.values())))
            self.pending.append((cid, n, self._hold(deltas)))
        self._release()

    def absent(self, cid: str) -> None:
        self.waiting.discard(cid)
        self._release()

    def settle(self) -> tuple[list[str], dict[str, list[str]]]:
        self.waiting.clear()
        by_norm = norm_verdicts(self.norms, self.config)
        for cid, n, load in self.pending:
            deltas = load()
            if cid not in by_norm:
                self._fold(n, deltas)
        self.pending = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        return [c for c in self.norms if c not in by_norm], {**self.rejected, **by_norm}

    def mean(self) -> dict[str, Tensor]:
        return {name: a / self.total_n for name, a in self.acc.items()}

    def _release(self) -> None:
        """Fold, in plan order, the leading updates the norm screen can no longer reject."""
        while self.pending and self._certain(self.norms[self.pending[0][0]]):
            cid, n, load = self.pending.pop(0)
            self._fold(n, load())

    def _certain(self, norm: float) -> bool:
        if self.config.norm_factor is None or norm == 0.0:
            return True
        lowest = statistics.median([*self.norms.values(), *([0.0] * len(self.waiting))])
        return norm <= self.config.norm_factor * lowest

    def _hold(self, deltas: dict[str, Tensor]) -> Callable[[], dict[str, Tensor]]:
        if not self.pending and self._certain(self.norms[next(reversed(self.norms))]):
            return lambda: deltas  # folded at once (by _release)
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="flexlora-sparse-"))
        path = self.folder / f"{len(self.norms)}.pt"
        torch.save(deltas, path)

        def load() -> dict[str, Tensor]:
            d = torch.load(path, weights_only=True)
            path.unlink()
            return d

        return load

    def _fold(self, n: int, deltas: dict[str, Tensor]) -> None:
        for name, d in deltas.items():
            self.acc[name] += n * d.to(self.dtype)
        self.total_n += n


def dense_problems(deltas: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Why a dense update must not be folded (empty: fine): the screen of
    :func:`flexlora.validate.validate_update` for full-weight updates."""
    problems = []
    if set(deltas) != set(shapes):
        problems.append(f"modules differ from the base model's ({len(set(deltas) ^ set(shapes))} differ)")
    for name in sorted(set(deltas) & set(shapes)):
        d = deltas[name]
        if tuple(d.shape) != tuple(shapes[name]):
            problems.append(f"module {name}: shape {tuple(d.shape)} does not match the base model's {tuple(shapes[name])}")
        elif not all_finite(d):
            problems.append(f"module {name}: sparse update contains NaN or Inf")
    return problems
