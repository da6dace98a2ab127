"""Prompt formats and tokenisation that keeps the response.

``alpaca`` is the paper's template (Alpaca / alpaca-lora, as the FlexLoRA code uses); ``chat`` is
the model's own chat template. Text is tokenised in three pieces (prompt head, the part that
may be cut, prompt tail) so that truncation removes the end of the input (then of the
instruction) and never the "### Response:" marker or the response itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flexlora.data.types import Example

Template = Literal["alpaca", "chat"]
TEMPLATES = ("alpaca", "chat")

_ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n"
)
_ALPACA_HEAD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n"
)


@dataclass(frozen=True)
class PromptParts:
    """prompt = head + instruction + middle + input + tail; the response follows the tail."""

    head: str
    instruction: str
    middle: str
    input: str
    tail: str


def prompt_parts(ex: Example, template: Template, tokenizer=None) -> PromptParts:
    if template == "alpaca":
        if ex.input:
            return PromptParts(_ALPACA_HEAD_INPUT, ex.instruction, "\n\n### Input:\n", ex.input, "\n\n### Response:\n")
        return PromptParts(_ALPACA_HEAD_NO_INPUT, ex.instruction, "", "", "\n\n### Response:\n")
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use template 'alpaca'")
        marker = "\x00FLEXLORA_SPLIT\x00"
        content = f"{marker}I{marker}" + (f"\n\n{marker}X{marker}" if ex.input else "")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        pieces = rendered.split(marker)
        if ex.input:
            if len(pieces) != 5 or pieces[1] != "I" or pieces[3] != "X":
                raise ValueError("the tokenizer's chat template altered the message; use template 'alpaca'")
            return PromptParts(pieces[0], ex.instruction, pieces[2], ex.input, pieces[4])
        if len(pieces) != 3 or pieces[1] != "I":
            raise ValueError("the tokenizer's chat template altered the message; use template 'alpaca'")
        return PromptParts(pieces[0], ex.instruction, "", "", pieces[2])
    raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _pieces(tokenizer, ex: Example, template: Template) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    p = prompt_parts(ex, template, tokenizer)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    return (bos, *(_ids(tokenizer, t) for t in (p.head, p.instruction, p.middle, p.input, p.tail)))  # type: ignore[return-value]


def encode_prompt(tokenizer, ex: Example, template: Template, max_prompt_tokens: int) -> list[int]:
    """Prompt token ids, at most ``max_prompt_tokens``: the input is cut first, then the instruction."""
    bos, head, instr, middle, inp, tail = _pieces(tokenizer, ex, template)
    fixed = len(bos) + len(head) + len(middle) + len(tail)
    budget = max_prompt_tokens - fixed
    if budget < 0:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is too small for the template itself ({fixed} tokens)")
    instr = instr[: max(0, budget - min(len(inp), budget // 2))] if len(instr) + len(inp) > budget else instr
    inp = inp[: max(0, budget - len(instr))]
    return bos + head + instr + middle + inp + tail


def encode_for_training(
    tokenizer, ex: Example, template: Template, max_length: int, train_on_inputs: bool = True, max_response_fraction: float = 0.5
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for causal-LM training; labels are -100 on the prompt unless ``train_on_inputs``
    (the paper trains on the whole sequence). A long response (with EOS) may take up to
    ``max_response_fraction`` of ``max_length``; the prompt keeps at least the template and the rest."""
    response = _ids(tokenizer, ex.output)
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    bos, head, _, middle, _, tail = _pieces(tokenizer, ex, template)
    fixed = len(bos) + len(head) + len(middle) + len(tail)
    if fixed >= max_length:
        raise ValueError(f"max_length={max_length} leaves no room after the {template} template ({fixed} tokens); raise train.max_length")
    floor = max(fixed, int(max_length * (1 - max_response_fraction)))
    prompt = encode_prompt(tokenizer, ex, template, min(max_length - 1, max(max_length - len(response), floor)))
    response = response[: max_length - len(prompt)]
    ids = prompt + response
    labels = list(ids) if train_on_inputs else [-100] * len(prompt) + response
    return ids, labels
