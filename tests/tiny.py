"""Tiny randomly initialised models and real PEFT adapters for tests (no download)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, intermediate: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def make_peft_adapter(
    path: Path, seed: int, r: int = 4, rank_pattern: dict | None = None, alpha: float = 16, alpha_pattern: dict | None = None,
    base_name: str = "tiny-llama", rslora: bool = False,
) -> Path:
    """Train-free but realistic: a PEFT adapter whose B is random (as after training), saved by PEFT itself."""
    model = tiny_llama(0)
    model.name_or_path = base_name  # PEFT records it as base_model_name_or_path
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0, use_rslora=rslora, task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(path))
    return path
