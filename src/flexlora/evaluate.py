"""Evaluation of a (federated) model on the clients' held-out data: generated Rouge-L plus cheap proxies.

The paper's metric is Rouge-L between the model's greedy generation and the reference, averaged
per client and then over clients weighted by data size (p_k = n_k / sum n_j). Generation is the
expensive part on CPU, so it is batched with a KV cache: prompts are sorted by length, LEFT
padded (so every row's last prompt token sits at the same position and new tokens are appended
in lock-step) and decoded greedily until EOS or ``max_new_tokens``.

Two proxies are available, always labelled ``proxy_*`` because neither is the paper's number:

* ``proxy_teacher_forced_rouge_l`` -- what the official FlexLoRA code reported: at every response
  position the argmax of the logits *given the gold prefix* is taken, the argmax tokens are decoded
  and scored against the (tokenised) reference. It needs one forward pass instead of up to
  ``max_new_tokens`` decoding steps, but it never lets the model see its own mistakes.
* ``proxy_eval_loss`` -- mean token cross-entropy over the response tokens.

Both only need logits where there are labels, so the output layer (49k x hidden for SmolLM2 -- the
largest matmul in a small model) is applied to those positions only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from flexlora.config import EvalConfig, RougeTokenizer
from flexlora.data.prompts import encode_prompt
from flexlora.data.types import ClientData, Example
from flexlora.models import model_device, plain_head_parts
from flexlora.precision import autocast_for, pass_precision
from flexlora.stats import record_intervals

__all__ = [
    "EvalResult",
    "UnicodeRougeTokenizer",
    "encode_prompts",
    "evaluate_clients",
    "generate",
    "generate_with_counts",
    "rouge_l",
    "teacher_forced",
]


# Model families whose causal-LM head is exactly ``lm_head(decoder(...).last_hidden_state)`` -- no
# logit soft-capping or scaling -- so the head can be applied to the labelled positions only.



@dataclass
class EvalResult:
    """Aggregated scores (Rouge-L x100). ``*_weighted`` weighs clients by ``ClientData.num_examples``
    (the paper's metric); ``*_mean`` weighs every client equally. Clients with no examples in the
    split are listed in ``per_client`` with ``rouge_l=None`` and left out of every average.
    ``per_client`` rows keep every example's score (``example_rouge_l``; with ``eval_loss`` also
    ``example_loss_sum`` / ``example_tokens``) and a digest of the examples scored, so figures can be
    resampled and paired; ``intervals`` holds each figure's 95% bootstrap interval (:mod:`flexlora.stats`)."""

    rouge_l_weighted: float
    rouge_l_mean: float
    per_client: list[dict[str, Any]]
    per_category: dict[str, dict[str, Any]]
    proxy_teacher_forced_rouge_l_weighted: float | None
    proxy_eval_loss: float | None
    num_examples: int
    generated_tokens: int
    seconds: float
    generation_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    intervals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- Rouge-L


class UnicodeRougeTokenizer:
    """rouge-score's tokenizer (its ``tokenize`` interface) extended to every script.

    Lowercases, keeps runs of Unicode letters/digits (``\\w`` without ``_``, as rouge-score also
    splits on ``_``) and Porter-stems ASCII words longer than 3 characters, exactly like the default;
    so on ASCII text both tokenizers agree. Han/kana characters are one token each, because those
    scripts do not separate words with spaces (a whole sentence would otherwise be one token).
    """

    _CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    _TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)

    def __init__(self, use_stemmer: bool = True) -> None:
        from nltk.stem import porter  # rouge-score's stemmer; imported here so a server that only aggregates needs neither

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = self._TOKEN.findall(text.lower())
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]
        return tokens


@functools.lru_cache(maxsize=4)
def _scorer(tokenizer: RougeTokenizer) -> Any:
    from rouge_score import rouge_scorer  # the [train] extra: a server that only aggregates does not install it

    if tokenizer == "default":
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if tokenizer == "unicode":
        return rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeRougeTokenizer(use_stemmer=True))
    raise ValueError(f"rouge_tokenizer must be 'default' or 'unicode', got {tokenizer!r}")


def rouge_l(prediction: str, reference: str, tokenizer: RougeTokenizer = "default") -> float:
    """Rouge-L F-measure x100 (rouge-score, Porter stemming), 0 when either side has no tokens."""
    return 100.0 * _scorer(tokenizer).score(reference, prediction)["rougeL"].fmeasure


# ------------------------------------------------------------------------------------------ generation


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config adds (e.g. an end-of-turn token)."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id: generation could never stop before max_new_tokens")
    return ids


def _pad_id(tokenizer: Any, eos_ids: Sequence[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]




def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable), so little padding is needed."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_prompts(tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig) -> list[list[int]]:
    """Prompt ids exactly as training formats them (same template and truncation rules)."""
    return [encode_prompt(tokenizer, ex, cfg.template, cfg.max_prompt_tokens) for ex in examples]


class _EvalMode:
    """eval() + inference_mode for the duration, restoring the model's training flag after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self._inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._inference.__exit__(*exc)
        self.model.train(self.was_training)


def _generate_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    cfg: EvalConfig,
    on_batch: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Greedy new-token ids per prompt (in input order), cut after the first EOS (kept)."""
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    device = model_device(model)
    precision = pass_precision(cfg, device, "generation")
    out: list[list[int]] = [[] for _ in prompts]
    for batch in _length_batches([len(p) for p in prompts], cfg.batch_size):
        width = max(len(prompts[i]) for i in batch)
        # Left padding built by hand: the tokenizer (and its padding_side) is never touched.
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompts[i])
            if n == 0:
                raise ValueError("cannot generate from an empty prompt")
            ids[row, width - n :] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[row, width - n :] = 1
        with autocast_for(precision, device):
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                num_beams=1,
                max_new_tokens=cfg.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
            )
        new = generated[:, width:].tolist()
        for row, i in enumerate(batch):
            toks = new[row]
            stop = next((j for j, t in enumerate(toks) if t in eos), None)
            out[i] = toks if stop is None else toks[: stop + 1]
        if on_batch is not None:
            on_batch()
    return out


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def generate_with_counts(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: EvalConfig,
    on_batch: Callable[[], None] | None = None,
) -> tuple[list[str], list[int]]:
    """Greedy responses (new tokens only, special tokens skipped, stripped) in input order, and the
    number of tokens generated for each (including the EOS when it was produced)."""
    prompts = encode_prompts(tokenizer, examples, cfg)
    with _EvalMode(model):
        new_ids = _generate_ids(model, tokenizer, prompts, cfg, on_batch)
    return [_decode(tokenizer, ids) for ids in new_ids], [len(ids) for ids in new_ids]


def generate(model: nn.Module, tokenizer: Any, examples: Sequence[Example], cfg: EvalConfig) -> list[str]:
    """Greedy, batched (left-padded, KV-cached) responses to ``examples``, in input order."""
    return generate_with_counts(model, tokenizer, examples, cfg)[0]


# ------------------------------------------------------------------------------ teacher-forced proxies


_plain_head_parts = plain_head_parts  # the one rule, in flexlora.models


def _tf_encode(tokenizer: Any, ex: Example, cfg: EvalConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the prompt exactly as for generation, the reference response plus
    EOS capped at ``max_new_tokens`` -- the proxy sees what generation sees and no more."""
    prompt = encode_prompt(tokenizer, ex, cfg.template, cfg.max_prompt_tokens)
    response = tokenizer(ex.output, add_special_tokens=False)["input_ids"] if ex.output else []
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    return prompt, response[: cfg.max_new_tokens]


def teacher_forced(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: EvalConfig,
    on_batch: Callable[[], None] | None = None,
    full_logits: bool = False,
) -> list[dict[str, Any]]:
    """Per example: ``prediction`` (decoded argmax at each response position given the gold prefix),
    ``reference`` (the decoded, capped gold response it is compared with), ``rouge_l`` between
    them, and ``loss_sum`` / ``num_tokens`` (cross-entropy summed over the response tokens).

    ``full_logits=True`` forces the plain ``model(...).logits`` path (also the fallback for model
    families not known to have a plain linear head)."""
    encoded = [_tf_encode(tokenizer, ex, cfg) for ex in examples]
    # Right padding is masked and never a label, so any id will do.
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = model_device(model)
    parts = None if full_logits else plain_head_parts(model)
    precision = pass_precision(cfg, device, "scoring")
    results: list[dict[str, Any]] = [{} for _ in examples]
    with _EvalMode(model):
        for batch in _length_batches([len(p) + len(r) for p, r in encoded], cfg.batch_size):
            width = max(len(encoded[i][0]) + len(encoded[i][1]) for i in batch)
            # Right padding: causal attention never lets a real token see the padding after it.
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            select = torch.zeros((len(batch), width), dtype=torch.bool)  # positions whose next token is a label
            for row, i in enumerate(batch):
                prompt, response = encoded[i]
                seq = prompt + response
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
                select[row, len(prompt) - 1 : len(seq) - 1] = True
            targets = ids[:, 1:][select[:, :-1]]
            ids_d, mask_d, select_d = ids.to(device), mask.to(device), select.to(device)
            with autocast_for(precision, device):
                if parts is not None:
                    decoder, head = parts
                    hidden = decoder(input_ids=ids_d, attention_mask=mask_d, use_cache=False).last_hidden_state
                    logits = head(hidden[select_d])
                else:
                    logits = model(input_ids=ids_d, attention_mask=mask_d, use_cache=False).logits[select_d]
            logits = logits.float()
            losses = nn.functional.cross_entropy(logits, targets.to(device), reduction="none").cpu()
            preds = logits.argmax(-1).cpu()
            start = 0
            for i in batch:
                n = len(encoded[i][1])
                pred_text = _decode(tokenizer, preds[start : start + n].tolist())
                ref_text = _decode(tokenizer, encoded[i][1])
                results[i] = {
                    "prediction": pred_text,
                    "reference": ref_text,
                    "rouge_l": rouge_l(pred_text, ref_text, cfg.rouge_tokenizer),
                    "loss_sum": float(losses[start : start + n].sum()),
                    "num_tokens": n,
                }
                start += n
            if on_batch is not None:
                on_batch()
    return results


# ---------------------------------------------------------------------------------------- aggregation


def _means(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float]:
    """(weighted by ``weight``, plain) mean of ``key`` over rows that have it. When every weight is
    zero (e.g. held-out clients with no training data) the weighted mean is the plain mean."""
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return math.nan, math.nan
    plain = sum(r[key] for r in rows) / len(rows)
    total = sum(r["weight"] for r in rows)
    weighted = sum(r["weight"] * r[key] for r in rows) / total if total > 0 else plain
    return weighted, plain


def _per_category(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for category in sorted({r["category"] for r in rows}):
        group = [r for r in rows if r["category"] == category and r["rouge_l"] is not None]
        if not group:
            continue
        weighted, plain = _means(group, "rouge_l")
        out[category] = {
            "rouge_l_weighted": weighted,
            "rouge_l_mean": plain,
            "num_clients": len(group),
            "num_examples": sum(r["n_examples"] for r in group),
        }
    return out


def _split_of(client: ClientData, cfg: EvalConfig) -> list[Example]:
    examples = client.eval if cfg.split == "eval" else client.test
    return list(examples if cfg.examples_per_client is None else examples[: cfg.examples_per_client])


def evaluate_clients(
    model: nn.Module,
    tokenizer: Any,
    clients: Sequence[ClientData],
    cfg: EvalConfig,
    progress: bool = True,
) -> EvalResult:
    """Generate for every client's (capped) split in one length-sorted pool of batches -- batching
    across clients keeps batches full -- score Rouge-L per example, average per client, then over
    clients (data-size weighted and plain) and per category; optionally add the proxies."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    start = time.perf_counter()
    selected = [(c, _split_of(c, cfg)) for c in clients]
    examples = [ex for _, exs in selected for ex in exs]  # client by client, in order
    if not examples:
        raise ValueError(f"no client has examples in split {cfg.split!r}")

    n_gen = math.ceil(len(examples) / cfg.batch_size)
    n_tf = n_gen if (cfg.teacher_forced or cfg.eval_loss) else 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        gen_task = bar.add_task(f"generating ({len(examples)} examples)", total=n_gen)
        gen_start = time.perf_counter()
        predictions, counts = generate_with_counts(model, tokenizer, examples, cfg, on_batch=lambda: bar.advance(gen_task))
        gen_seconds = time.perf_counter() - gen_start
        tf: list[dict[str, Any]] | None = None
        if n_tf:
            tf_task = bar.add_task("teacher-forced proxies", total=n_tf)
            tf = teacher_forced(model, tokenizer, examples, cfg, on_batch=lambda: bar.advance(tf_task))

    scores = [rouge_l(p, ex.output, cfg.rouge_tokenizer) for p, ex in zip(predictions, examples)]
    per_client: list[dict[str, Any]] = []
    offset = 0
    for client, exs in selected:
        idx = range(offset, offset + len(exs))
        offset += len(exs)
        row: dict[str, Any] = {
            "client_id": client.client_id,
            "category": client.category,
            "n_examples": len(exs),
            "rouge_l": sum(scores[j] for j in idx) / len(idx) if idx else None,
            "weight": client.num_examples,
            "heldout": client.heldout,
            "example_rouge_l": [scores[j] for j in idx],
            "examples_digest": _examples_digest(exs),
        }
        if tf is not None and cfg.teacher_forced:
            row["proxy_teacher_forced_rouge_l"] = sum(tf[j]["rouge_l"] for j in idx) / len(idx) if idx else None
        if tf is not None and cfg.eval_loss:
            tokens = sum(tf[j]["num_tokens"] for j in idx)
            row["proxy_eval_loss"] = sum(tf[j]["loss_sum"] for j in idx) / tokens if tokens else None
            row["example_loss_sum"] = [tf[j]["loss_sum"] for j in idx]
            row["example_tokens"] = [tf[j]["num_tokens"] for j in idx]
        per_client.append(row)

    weighted, plain = _means(per_client, "rouge_l")
    result = EvalResult(
        rouge_l_weighted=weighted,
        rouge_l_mean=plain,
        per_client=per_client,
        per_category=_per_category(per_client),
        proxy_teacher_forced_rouge_l_weighted=_means(per_client, "proxy_teacher_forced_rouge_l")[0] if cfg.teacher_forced else None,
        # Client-level token means, weighted by data size like the main metric.
        proxy_eval_loss=_means(per_client, "proxy_eval_loss")[0] if cfg.eval_loss else None,
        num_examples=len(examples),
        generated_tokens=sum(counts),
        seconds=time.perf_counter() - start,
        generation_seconds=gen_seconds,
        config=cfg.settings(),
    )
    result.intervals = record_intervals(result.to_dict())
    return result


def _examples_digest(examples: Sequence[Example]) -> str:
    """Which examples a client was scored on: two results pair only when these agree."""
    text = json.dumps([[ex.instruction, ex.input, ex.output] for ex in examples], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
