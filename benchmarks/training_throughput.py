"""Tokens/s of flexlora's local-training step vs a bare PEFT + torch loop, same model, batches and ranks.

Both train SmolLM2-135M-Instruct with LoRA on the 7 target modules, on the same length-bucketed,
dynamically padded batches of Alpaca-formatted NI prompts (or the built-in suite when
../shared is absent), with AdamW, for the same number of steps. The bare loop is what a user
would write: ``get_peft_model`` + ``model(**batch, labels=...)`` (full logits over the 49k
vocabulary) + ``backward`` + ``step``. Ours adds what a federated client needs (share loading,
factor extraction, adapter removal) and applies the output layer only at labelled positions.

    python benchmarks/training_throughput.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

from flexlora.data.types import ClientData, Example  # noqa: E402
from flexlora.methods import FlexLoRA  # noqa: E402
from flexlora.models import ModelConfig, load_model  # noqa: E402
from flexlora.resources import target_module_names  # noqa: E402
from flexlora.train import LocalTrainer, TrainConfig, collate, length_bucketed_batches, tokenize_client  # noqa: E402
from flexlora.update import ModuleSpec  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NI = Path(__file__).resolve().parents[2] / "shared" / "data" / "flexlora-ni" / "tiny.jsonl.gz"


def load_examples(n: int) -> tuple[ClientData, str]:
    if NI.exists():
        exs = []
        with gzip.open(NI, "rt") as f:
            for line in f:
                c = json.loads(line)
                exs += [Example(c["definition"], r["input"], r["output"]) for r in c["train"]]
        random.Random(0).shuffle(exs)
        return ClientData(0, "ni", exs[:n], [], num_train_full=n), "NI tiny.jsonl.gz"
    from flexlora.data.suite import make_suite

    exs = [e for c in make_suite(8, n, 1, seed=0) for e in c.train]
    return ClientData(0, "suite", exs[:n], [], num_train_full=n), "built-in suite"


def bare_loop(model, tokenizer, data, rank, cfg: TrainConfig, steps: int) -> tuple[float, int]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=cfg.lr)
    peft_model.train()
    batches = length_bucketed_batches([len(i) for i, _ in data], cfg.batch_size, random.Random(0))
    tokens = 0
    for step in range(steps):
        b = collate([data[i] for i in batches[step % len(batches)]], tokenizer.pad_token_id)
        out = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    seconds = time.perf_counter() - t0
    peft_model.unload()
    return seconds, tokens


def ours(model, tokenizer, client, rank, cfg: TrainConfig, steps: int) -> tuple[float, int]:
    shapes = target_module_names(model, TARGETS)
    spec = {n: ModuleSpec(min(rank, min(s)), 16.0) for n, s in shapes.items()}
    method = FlexLoRA()
    share = method.share_for(method.initial_state(shapes), spec)
    trainer = LocalTrainer(model, tokenizer, TARGETS, TrainConfig(**{**cfg.__dict__, "max_steps": steps, "local_epochs": 1e9}))
    t0 = time.perf_counter()
    result = trainer.train_client(client, spec, share, seed=0)
    return time.perf_counter() - t0, result.metrics["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ranks", default="8,200")
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 12)
    model, tokenizer = load_model(ModelConfig(source="smollm2"))
    cfg = TrainConfig(batch_size=4, max_length=320, lr=1e-4)
    client, source = load_examples(64)
    data = tokenize_client(tokenizer, client, cfg)
    rows = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        ours(model, tokenizer, client, rank, cfg, 1)  # warm-up (allocator, thread pool)
        # interleave the two measurements so drifting machine load hits both alike
        t_bare, tok_bare = bare_loop(model, tokenizer, data, rank, cfg, steps)
        t_ours, tok_ours = ours(model, tokenizer, client, rank, cfg, steps)
        row = {
            "rank": rank,
            "steps": steps,
            "bare_tokens_per_s": tok_bare / t_bare,
            "ours_tokens_per_s": tok_ours / t_ours,
            "bare_seconds": t_bare,
            "ours_seconds": t_ours,
            "tokens_bare": tok_bare,
            "tokens_ours": tok_ours,
        }
        row["ratio"] = row["ours_tokens_per_s"] / row["bare_tokens_per_s"]
        rows.append(row)
        print(f"rank {rank:>3}: ours {row['ours_tokens_per_s']:.1f} tok/s, bare PEFT loop {row['bare_tokens_per_s']:.1f} tok/s, ratio {row['ratio']:.2f}")
    result = {
        "benchmark": "training_throughput",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        "data": source,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "targets": TARGETS,
        "rows": rows,
        "min_ratio": min(r["ratio"] for r in rows),
        "target": ">= 0.9",
        "target_met": min(r["ratio"] for r in rows) >= 0.9,
        "environment": environment(),
    }
    path = write_json(RESULTS_DIR / ("training_throughput_quick.json" if args.quick else "training_throughput.json"), result)
    print(f"min ratio {result['min_ratio']:.2f} (target >= 0.9: {'met' if result['target_met'] else 'NOT met'}) -> {path}")


if __name__ == "__main__":
    main()
