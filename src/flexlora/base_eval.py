"""The base model's evaluation, scored once for every run of a comparison that would score it.

Before round 1 no method has an update yet (every initial state is empty, nothing is merged), so a
run's round-0 evaluation scores the base model itself. ``flexlora compare`` runs several methods on
one model, one data set and one eval config: those round-0 evaluations are the same computation,
and the same record (timings aside). :class:`BaseEvaluations` computes it for the first run and
hands a copy to the others, keyed by :func:`evaluation_key`: a digest of everything the evaluation
reads (the model's weights, config and tokenizer, the device, the eval settings with the precision each pass resolves to,
and each evaluated client's identity, weight and examples), so a run that differs in any of them
computes its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Callable, Sequence

import torch
from torch import nn

from flexlora.config import EvalConfig
from flexlora.data.types import ClientData
from flexlora.precision import pass_precision


def model_digest(model: nn.Module, tokenizer: Any) -> str:
    """sha256 of what the model and tokenizer bring to an evaluation: every parameter and buffer
    (names, dtypes, shapes, bytes), the model's config and generation config, the tokenizer's
    vocabulary and its EOS / padding ids."""
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}  # tied weights (SmolLM2's embedding and output layer) are hashed once
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.stride()}".encode())
        same = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if same in seen and t.numel():
            h.update(f"={seen[same]}\n".encode())
            continue
        seen[same] = name
        h.update(b"\n")
        if t.numel():
            h.update(memoryview(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
    for part in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        h.update((part.to_json_string() if part is not None else "-").encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps([sorted(vocab.items()), tokenizer.eos_token_id, tokenizer.pad_token_id], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def evaluation_key(model: str, device: torch.device, clients: Sequence[ClientData], cfg: EvalConfig) -> str:
    """A digest of everything :func:`flexlora.evaluate.evaluate_clients` reads: the model and its
    tokenizer (``model``, see :func:`model_digest`), the device, every eval setting and
    the precision each pass resolves to there, and per client its id, category, weight, held-out flag
    and the examples it is scored on (its ``split``, capped at ``examples_per_client``)."""
    def scored(c: ClientData) -> list[list[str]]:
        examples = c.eval if cfg.split == "eval" else c.test
        examples = examples if cfg.examples_per_client is None else examples[: cfg.examples_per_client]
        return [[ex.instruction, ex.input, ex.output] for ex in examples]

    payload = {
        "model": model,
        "device": str(device),
        "config": cfg.settings(),
        "precision": {p: pass_precision(cfg, device, p) for p in ("generation", "scoring")},
        "clients": [[c.client_id, c.category, c.num_examples, c.heldout, scored(c)] for c in clients],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


class BaseEvaluations:
    """Round-0 evaluations of a base model shared between runs (``compare`` holds one for its runs).

    ``get(key, run, compute)`` returns the record stored under ``key`` (a copy, with ``shared_from``
    naming the run that computed it) or computes, stores and returns it."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[str, dict[str, Any]]] = {}

    def get(self, key: str, run: str, compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
        """(the record, the run it was computed in, or None when computed now)."""
        if key in self.records:
            source, record = self.records[key]
            return {**copy.deepcopy(record), "shared_from": source}, source
        record = compute()
        self.records[key] = (run, copy.deepcopy(record))
        return record, None
