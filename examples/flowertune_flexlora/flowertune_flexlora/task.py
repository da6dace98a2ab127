"""The app's own model, data and training loop, as in FlowerTune's LLM examples: Hugging Face
transformers + PEFT and a plain PyTorch loop. Nothing here knows about FlexLoRA; the only
difference from a FedAvg app is that each node builds its LoRA at its own ranks."""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch
from peft import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP = ("gate_proj", "up_proj", "down_proj")


def lora_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> LoraConfig:
    """The run's LoRA config at this node's ranks (``rank-attention`` / ``rank-mlp`` in its node config)."""
    node_config = node_config or {}
    r = int(node_config.get("rank-attention", run_config["lora-r"]))
    r_mlp = int(node_config.get("rank-mlp", r))
    return LoraConfig(
        r=r,
        lora_alpha=float(run_config["lora-alpha"]),
        lora_dropout=float(run_config["lora-dropout"]),
        target_modules=TARGETS,
        rank_pattern={m: r_mlp for m in MLP} if r_mlp != r else {},
        task_type="CAUSAL_LM",
    )


def load_base(run_config: Mapping[str, Any]):
    """(model, tokenizer): "tiny" is a random tiny Llama with SmolLM2's tokenizer (no download);
    anything else is a local Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(run_config.get("threads", 1)))
    source = str(run_config["model"])
    if source == "tiny":
        from flexlora.models import ModelConfig, load_model

        return load_model(ModelConfig(source="tiny", device="cpu", dtype="float32", seed=int(run_config["seed"])))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(source), tokenizer


def peft_model(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None):
    model, tokenizer = load_base(run_config)
    return get_peft_model(model, lora_config(run_config, node_config)), tokenizer


def partition(run_config: Mapping[str, Any], partition_id: int):
    """This node's data: one task of the built-in instruction suite (train and eval examples)."""
    from flexlora.data.suite import make_suite

    clients = make_suite(int(run_config["suite-clients"]), int(run_config["suite-examples"]), 2, seed=int(run_config["seed"]))
    train = [c for c in clients if not c.heldout]
    if not 0 <= partition_id < len(train):
        raise ValueError(f"partition-id {partition_id}: the suite has {len(train)} training partitions")
    return train[partition_id]


def batches(tokenizer, examples, batch_size: int, max_length: int, seed: int):
    """Shuffled, padded Alpaca-format batches; the loss covers the whole sequence (as the paper trains)."""
    from flexlora.data.prompts import encode_for_training

    order = list(examples)
    random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        rows = [encode_for_training(tokenizer, ex, "alpaca", max_length) for ex in order[i : i + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        yield {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        }


def train(model, tokenizer, examples, run_config: Mapping[str, Any], seed: int) -> float:
    """``max-steps`` AdamW steps on the LoRA weights; returns the mean training loss."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(run_config["lr"]))
    model.train()
    losses: list[float] = []
    steps, epoch = int(run_config["max-steps"]), 0
    while len(losses) < steps:
        for batch in batches(tokenizer, examples, int(run_config["batch-size"]), int(run_config["max-length"]), seed + epoch):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        epoch += 1
    model.eval()
    return sum(losses) / len(losses)


@torch.no_grad()
def eval_loss(model, tokenizer, examples, run_config: Mapping[str, Any]) -> float:
    model.eval()
    losses = [float(model(**b).loss) for b in batches(tokenizer, examples, int(run_config["batch-size"]), int(run_config["max-length"]), 0)]
    return sum(losses) / max(1, len(losses))
