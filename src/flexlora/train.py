"""One client's local training: attach an adapter at its own ranks, load its share, train, extract.

One base model stays in memory for the whole run. For every selected client a PEFT LoRA
adapter is injected with the client's per-module ranks (``rank_pattern``), initialised from
its share of the global state, trained, read back as plain factors, and removed again
(``unload``), so memory does not grow with the number of clients.

The loop is deliberately plain (nanoGPT-style): length-bucketed batches with dynamic
padding, loss over the labelled tokens only, and the 49k-vocabulary output layer applied
only at those positions, which is where most CPU time would otherwise go. ``precision``
(:mod:`flexlora.precision`) puts the forward pass under bfloat16 autocast on a CPU that multiplies
bfloat16 natively; the factors, their gradients, the optimizer state and the loss stay float32.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from flexlora.config import TrainConfig
from flexlora.data.prompts import encode_for_training
from flexlora.data.types import ClientData
from flexlora.models import is_low_precision, model_device, plain_head_parts, weight_is_transposed
from flexlora.precision import autocast_for, resolve_precision
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec

ADAPTER = "default"
# torch.OutOfMemoryError appeared in torch 2.5; torch.cuda.OutOfMemoryError is older (and the same class since)
OUT_OF_MEMORY = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})



class ClientOutOfMemory(RuntimeError):
    """A client's local training ran out of accelerator memory: that client's failure, not the run's."""


def use_deterministic_kernels() -> None:
    """``train.deterministic``: the same config and seed give the same bytes on the same CUDA device.

    CPU kernels already are deterministic; on CUDA, atomics-based kernels (index_add, scatter, the
    flash and memory-efficient attention backward) and cuBLAS's split-K workspaces are not. This sets
    torch's deterministic-algorithms switch (an op with no deterministic kernel then raises instead of
    silently varying), the cuBLAS workspace size it requires (``CUBLAS_WORKSPACE_CONFIG``, read when
    cuBLAS starts: set before the first CUDA matmul, which is why runs call this before loading the
    model), cuDNN's deterministic mode, and restricts scaled-dot-product attention to its math kernel.
    These are process-wide torch switches: they stay on for the rest of the process."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)


def remove_lora_layers(model):
    """Put back the plain layer wherever a PEFT LoRA layer wraps one (an adapter whose attachment failed
    half way has no PeftModel to ``unload``); returns the model, unchanged when it holds none."""
    for name, module in list(model.named_modules()):
        base_layer = getattr(module, "base_layer", None)
        if base_layer is not None and hasattr(module, "lora_A") and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base_layer)
    if "peft_config" in model.__dict__:
        del model.peft_config
    return model


@dataclass
class TrainResult:
    update: ClientUpdate
    metrics: dict[str, Any] = field(default_factory=dict)


def tokenize_client(tokenizer, client: ClientData, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    examples = client.train if cfg.max_examples is None else client.train[: cfg.max_examples]
    return [encode_for_training(tokenizer, ex, cfg.template, cfg.max_length, cfg.train_on_inputs) for ex in examples]


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, bucket_factor: int = 8) -> list[list[int]]:
    """Shuffle, then sort within windows of ``bucket_factor`` batches so batches hold similar
    lengths (less padding), then shuffle the batches. Every index appears exactly once."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def total_steps(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps of one local training: ``local_epochs`` over the data, capped by ``max_steps``."""
    steps = max(1, math.ceil(cfg.local_epochs * math.ceil(num_examples / (cfg.batch_size * cfg.grad_accum))))
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def plan_batches(lengths: Sequence[int], cfg: TrainConfig, rng: random.Random) -> list[list[list[int]]]:
    """Per optimizer step, its micro-batches of example indices (epochs re-shuffle via ``rng``)."""
    plan: list[list[list[int]]] = []
    pool: list[list[int]] = []
    for _ in range(total_steps(len(lengths), cfg)):
        step = []
        for _ in range(cfg.grad_accum):
            if not pool:
                pool = length_bucketed_batches(lengths, cfg.batch_size, rng)
            step.append(pool.pop())
        plan.append(step)
    return plan


def planned_tokens(tokenizer, client: ClientData, cfg: TrainConfig, seed: int, data: list[tuple[list[int], list[int]]] | None = None) -> int:
    """The number of real (non-padding) tokens ``train_client`` will process: count before you run
    (``data``: the client's already tokenized examples)."""
    data = tokenize_client(tokenizer, client, cfg) if data is None else data
    rng = random.Random(seed)
    return sum(len(data[i][0]) for step in plan_batches([len(ids) for ids, _ in data], cfg, rng) for mb in step for i in mb)


def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch to its own longest sequence (dynamic padding), on the CPU."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A collated batch on the model's device (pinned and asynchronous on CUDA)."""
    if device.type == "cpu":
        return dict(batch)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


class _LossLog:
    """Per-step training loss, kept on the device and read back once after training (one sync)."""

    def __init__(self) -> None:
        self._sums: list[Tensor] = []
        self._where: list[tuple[int, int]] = []  # (step, labelled tokens of that step)
        self._step = -1

    def new_step(self) -> None:
        self._step += 1

    def add(self, loss_sum: Tensor, n_labelled: int) -> None:
        self._sums.append(loss_sum.detach().float())
        self._where.append((self._step, n_labelled))

    def per_step(self) -> list[float]:
        values = torch.stack(self._sums).cpu().tolist() if self._sums else []
        steps: dict[int, float] = {}
        for v, (step, n) in zip(values, self._where):
            steps[step] = steps.get(step, 0.0) + v / n
        return [steps[k] for k in sorted(steps)]


class _MicroBatch:
    """A micro-batch on the device, with the counts that logging needs taken on the host (no sync)."""

    def __init__(self, items: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> None:
        host = collate(items, pad_id)
        host["positions"], host["targets"] = labelled_positions(host["labels"])
        self.labelled = int(host["targets"].numel())
        self.tokens = int(host["attention_mask"].sum())
        self.padded = host["input_ids"].numel()
        self.batch = to_device(host, device)


def train_steps(model, data: Sequence[tuple[list[int], list[int]]], pad_id: int, cfg: TrainConfig, rng: random.Random, device: torch.device,
                params: list[Tensor], opt: torch.optim.Optimizer, extra_loss=None) -> tuple[list[float], int, int]:
    """The local steps (nanoGPT-style): length-bucketed micro-batches, the loss over labelled tokens
    averaged over the step's labelled tokens, ``extra_loss(micro-batches per step)`` added to each
    micro-batch's loss (a method's penalty), gradient clipping, one optimiser step per step. Returns
    the per-step losses, the tokens and the padded positions seen. LoRA and SLoRA's sparse stage train with it."""
    loss_log, tokens, padded = _LossLog(), 0, 0
    for step_batches in plan_batches([len(ids) for ids, _ in data], cfg, rng):
        opt.zero_grad(set_to_none=True)
        micro = [_MicroBatch([data[i] for i in idx], pad_id, device) for idx in step_batches]
        n_labelled = max(1, sum(m.labelled for m in micro))
        loss_log.new_step()
        for m in micro:
            with autocast_for(cfg.precision, device):
                loss_sum, _ = labelled_token_loss(model, m.batch)
            loss = loss_sum / n_labelled
            if extra_loss is not None:
                loss = loss + extra_loss(len(micro))
            loss.backward()
            loss_log.add(loss_sum, n_labelled)
            tokens += m.tokens
            padded += m.padded
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return loss_log.per_step(), tokens, padded


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(flat row-major indices into the (batch x length) positions whose *next* token is labelled,
    those next tokens): made once on the host, so the device never waits on a boolean mask."""
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # position t predicts token t + 1
    index = (nxt != -100).flatten().nonzero().squeeze(1)
    return index, nxt.flatten().index_select(0, index)


def labelled_token_loss(model, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Runs the decoder, then the output layer only on positions whose next token is labelled.
    Falls back to the model's full logits for architectures it does not recognise. ``batch`` may
    carry ``positions`` and ``targets`` from :func:`labelled_positions` (made on the host)."""
    if "positions" in batch:
        index, targets = batch["positions"], batch["targets"]
    else:
        index, targets = labelled_positions(batch["labels"])
    count = int(targets.numel())
    parts = plain_head_parts(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    else:
        decoder, head = parts
        logits = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    picked = logits.flatten(0, 1).index_select(0, index)  # a view, then a gather: no copy of the batch
    if parts is not None:
        picked = head(picked)  # the output layer at the scored positions only
    return torch.nn.functional.cross_entropy(picked.float(), targets, reduction="sum"), count


class LocalTrainer:
    """Trains clients one at a time on one shared base model."""

    def __init__(self, model, tokenizer, target_leaves: Sequence[str] | str, cfg: TrainConfig, penalty=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.targets = target_leaves  # lora.targets, as configured (the spec of each client names its layers)
        self.cfg = cfg
        self.penalty = penalty  # a method's extra loss term (:class:`flexlora.methods.base.LocalPenalty`), or None
        if cfg.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")

    # -- adapter life cycle --------------------------------------------------------------------
    def attach(self, spec: Mapping[str, ModuleSpec]):
        """Inject a LoRA adapter with per-module ranks; returns the PeftModel."""
        from peft import LoraConfig, get_peft_model

        ranks = {name: s.rank for name, s in spec.items()}
        alphas = {name: s.alpha for name, s in spec.items()}
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        a0 = max(set(alphas.values()), key=list(alphas.values()).count)
        lora_config = LoraConfig(
            r=r0,
            lora_alpha=a0,
            rank_pattern={re_exact(n): r for n, r in ranks.items() if r != r0},
            alpha_pattern={re_exact(n): a for n, a in alphas.items() if a != a0},
            target_modules=sorted(spec),
            lora_dropout=self.cfg.lora_dropout,
            bias="none",
            use_rslora=any(s.rslora for s in spec.values()),
            fan_in_fan_out=any(weight_is_transposed(self.model.get_submodule(n)) for n in spec),  # GPT-2's Conv1D
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(self.model, lora_config)
        if self.cfg.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
            base = peft_model.get_base_model()
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return peft_model

    def sum_adapter_in_float32(self, peft_model, names: Sequence[str]) -> list:
        """Under bf16 autocast, hand each adapted layer's base output to PEFT in float32, so PEFT adds the
        adapter's output to it in float32 (returns the hook handles).

        PEFT computes ``base_layer(x) + lora_B(lora_A(x)) * scale``; under autocast both terms are
        bfloat16 and so is their sum, which rounds away any adapter contribution below half a bfloat16
        step of the base output (2^-9 of it): early in training, with B near 0, that is all of it, and
        the forward pass does not see what the adapter has learnt (the demo then trained measurably
        slower). The matmuls stay bfloat16; only the sum and the layer's output are float32."""

        def upcast(module, args, output):
            return output.float() if output.dtype == torch.bfloat16 else None

        base = peft_model.get_base_model()
        return [base.get_submodule(name).base_layer.register_forward_hook(upcast) for name in names]

    @staticmethod
    def load_share(peft_model, share: Mapping[str, LoraFactors]) -> None:
        base = peft_model.get_base_model()
        with torch.no_grad():
            for name, f in share.items():
                layer = base.get_submodule(name)
                A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                if tuple(A.shape) != tuple(f.A.shape) or tuple(B.shape) != tuple(f.B.shape):
                    raise ValueError(f"module {name}: adapter is A{tuple(A.shape)} B{tuple(B.shape)} but the share is A{tuple(f.A.shape)} B{tuple(f.B.shape)}")
                if not math.isclose(float(layer.scaling[ADAPTER]), f.scale, rel_tol=1e-6):
                    raise ValueError(f"module {name}: adapter scale {layer.scaling[ADAPTER]} != share scale {f.scale}")
                A.copy_(f.A)
                B.copy_(f.B)

    @staticmethod
    def extract(peft_model, names: Sequence[str]) -> dict[str, LoraFactors]:
        base = peft_model.get_base_model()
        out = {}
        for name in names:
            layer = base.get_submodule(name)
            out[name] = LoraFactors(  # what leaves a client lives on the CPU, in float32
                A=layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True),
                B=layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True),
                scale=float(layer.scaling[ADAPTER]),
            )
        return out

    def detach(self, peft_model) -> None:
        """Remove the adapter layers, leaving the base model exactly as it was."""
        if self.cfg.gradient_checkpointing:
            base = peft_model.get_base_model()
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
        self.model = peft_model.unload()

    # -- training ---------------------------------------------------------------------------------
    def train_client(self, client: ClientData, spec: Mapping[str, ModuleSpec], share: Mapping[str, LoraFactors], seed: int) -> TrainResult:
        """Train one client on the model's device; running out of accelerator memory raises
        :class:`ClientOutOfMemory` after the adapter is removed and the memory released. Whatever
        fails, also while the adapter is being attached, the shared model is left without LoRA layers."""
        try:
            return self._train_client(client, spec, share, seed)
        except OUT_OF_MEMORY as e:
            message = str(e).splitlines()[0] if str(e) else "out of memory"
        except BaseException:
            self.model = remove_lora_layers(self.model)
            raise
        self.model = remove_lora_layers(self.model)
        release_accelerator_memory()
        raise ClientOutOfMemory(f"client {client.client_id} ran out of accelerator memory ({message})")

    def _train_client(self, client: ClientData, spec: Mapping[str, ModuleSpec], share: Mapping[str, LoraFactors], seed: int) -> TrainResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        rng = random.Random(seed)
        data = tokenize_client(self.tokenizer, client, cfg)
        if not data:
            raise ValueError(f"client {client.client_id} has no training examples")
        peft_model = self.attach(spec)
        hooks: list = []
        try:
            self.load_share(peft_model, share)
            params_A, params_B, pairs = [], [], []
            base = peft_model.get_base_model()
            for name in spec:
                layer = base.get_submodule(name)
                A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                A.requires_grad_(not cfg.freeze_A)
                B.requires_grad_(not cfg.freeze_B)
                if not cfg.freeze_A:
                    params_A.append(A)
                if not cfg.freeze_B:
                    params_B.append(B)
                pairs.append((A, B))
            params = params_A + params_B
            if not params:
                raise ValueError("train.freeze_A and train.freeze_B together leave nothing to train")
            if cfg.optimizer == "adamw":
                opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            else:
                opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            device = model_device(peft_model)
            if resolve_precision(cfg.precision, device) == "bf16-autocast":
                hooks += self.sum_adapter_in_float32(peft_model, list(spec))
            peft_model.train()
            penalty = self.penalty
            extra = None if penalty is None else (lambda n_micro: penalty.weight / n_micro * penalty.term(pairs))
            losses, tokens, padded = train_steps(peft_model, data, self.tokenizer.pad_token_id, cfg, rng, device, params, opt, extra)
            peft_model.eval()
            factors = self.extract(peft_model, list(spec))
        finally:
            for hook in hooks:
                hook.remove()
            self.detach(peft_model)
        seconds = time.perf_counter() - t0
        update = ClientUpdate(client_id=str(client.client_id), num_examples=client.num_examples, modules=factors)
        metrics = {
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean": sum(losses) / len(losses),
            "steps": len(losses),
            "tokens": tokens,
            "padding_fraction": 1 - tokens / max(1, padded),
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "precision": resolve_precision(cfg.precision, device),
        }
        return TrainResult(update=update, metrics=metrics)


def re_exact(name: str) -> str:
    """A PEFT pattern key that matches exactly this module (PEFT treats the keys as regexes)."""
    import re

    return re.escape(name)


def hold_in_float32(module, on: bool) -> None:
    """Keep a bfloat16/float16 linear layer's weight (and bias) in float32 and compute the layer in
    float32 (its input is cast up, its output back to the model's dtype), or undo that (``on=False``).
    A merged ``W0 + dW`` is then exact: in bfloat16 any ``|dW|`` below 2^-9 ``|W0|`` rounds away.
    A no-op for float32 layers and for a layer already in the asked state."""
    held = getattr(module, "flexlora_compute_dtype", None)
    if on and held is None and is_low_precision(module.weight.dtype):
        dtype = module.weight.dtype
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if p is not None:
                setattr(module, pname, torch.nn.Parameter(p.detach().float(), requires_grad=p.requires_grad))
        module.flexlora_compute_dtype = dtype
        module.flexlora_float32_hooks = (
            module.register_forward_pre_hook(lambda mod, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)),
            module.register_forward_hook(lambda mod, args, out: out.to(dtype)),
        )
    elif not on and held is not None:
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if p is not None:
                setattr(module, pname, torch.nn.Parameter(p.detach().to(held), requires_grad=p.requires_grad))
        for hook in module.flexlora_float32_hooks:
            hook.remove()
        del module.flexlora_compute_dtype, module.flexlora_float32_hooks


def apply_dense_delta(model, deltas: Mapping[str, Tensor], originals: Mapping[str, Tensor]) -> None:
    """Set ``W = W_original + delta`` for each named linear layer (FLoRA merges; evaluation merges).
    ``delta`` is (d_out, d_in); a Conv1D weight (GPT-2), stored (d_in, d_out), takes its transpose.
    ``originals`` may live on another device (the CPU). In a bfloat16/float16 model a layer with a
    delta is held in float32 (:func:`hold_in_float32`), so the merge is exact in float32 arithmetic;
    a layer without one goes back to its original weight and dtype."""
    with torch.no_grad():
        for name, original in originals.items():
            module = model.get_submodule(name)
            if name in deltas:
                hold_in_float32(module, True)
                weight = module.weight
                delta = deltas[name].to(weight.device)
                delta = delta.T if weight_is_transposed(module) else delta
                weight.copy_((original.to(weight.device, delta.dtype) + delta).to(weight.dtype))
            else:
                hold_in_float32(module, False)
                module.weight.copy_(original)


def release_accelerator_memory() -> None:
    """Give cached accelerator memory back after a failure (a no-op on the CPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
