"""The app's model, data and training loop; nothing here knows about FlexLoRA. Each node's LoRA rank:
:func:`node_rank`."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from peft import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def node_rank(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> int:
    """A deployed node says its rank (``--node-config 'lora-r=8'``); a simulated node has only its
    ``partition-id``, which indexes the run config's ``node-ranks`` ("2,4,8,16"); else the declared rank."""
    node_config = node_config or {}
    if "lora-r" in node_config:
        return int(node_config["lora-r"])
    ranks = [int(r) for r in str(run_config.get("node-ranks", "")).split(",") if r.strip()]
    if ranks and "partition-id" in node_config:
        return ranks[int(node_config["partition-id"]) % len(ranks)]
    return int(run_config["lora-r"])


def lora_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> LoraConfig:
    r = node_rank(run_config, node_config)
    return LoraConfig(r=r, lora_alpha=float(run_config["lora-alpha"]), lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def base_model():
    """A tiny random Llama stands in for the app's base model (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()


def get_model(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None):
    """The PEFT model at this node's rank."""
    return get_peft_model(base_model(), lora_config(run_config, node_config))


def load_data(partition_id: int) -> torch.Tensor:
    """This node's training sequences (token ids); partitions differ in size, so weights differ."""
    g = torch.Generator().manual_seed(1000 + partition_id)
    return torch.randint(0, 128, (6 + 2 * partition_id, 12), generator=g)


def train(model, data: torch.Tensor, run_config: Mapping[str, Any], seed: int) -> float:
    """``local-steps`` AdamW steps on the LoRA weights; the mean training loss."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(run_config["lr"]))
    model.train()
    losses = []
    for step in range(int(run_config["local-steps"])):
        batch = data[(step * 4) % len(data):][:4]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses) / len(losses)
