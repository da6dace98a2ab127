"""How much does one client's local training move the model, as a function of its LoRA rank?

The paper-mini runs give every client 3 local AdamW steps from a B = 0 start. With PEFT's scale
alpha / r the update ``(alpha / r) B A`` of a rank-200 client is much smaller than that of a
rank-8 client after the same steps (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor
for Fine-Tuning with LoRA"): a federation of mostly rank-200 clients (heavy-tail-strong) then
moves the global model less per round than a rank-8 federation. This probe measures it directly
on the same clients, batches and seeds: for ranks 8 / 30 / 200 with alpha / r and with rsLoRA's
alpha / sqrt(r), the norm of the update ``||Delta W||_F`` (over all target modules) and how much it
lowers the loss on a fixed batch of the client's own training examples (its first 8).

    python benchmarks/rank_scale_probe.py [--clients 6] [--data PATH]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

from flexlora.config import load_config  # noqa: E402
from flexlora.methods import FlexLoRA  # noqa: E402
from flexlora.models import load_model  # noqa: E402
from flexlora.resources import target_module_names  # noqa: E402
from flexlora.data.clients import load_clients  # noqa: E402
from flexlora.train import LocalTrainer, apply_dense_delta, collate, labelled_token_loss, tokenize_client  # noqa: E402
from flexlora.update import ModuleSpec  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "paper_mini.toml"
RANKS = (8, 30, 200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--data", help="NI data path (default: the paper_mini config's)")
    args = ap.parse_args()
    overrides = [f'data.path="{args.data}"'] if args.data else []
    cfg = load_config(CONFIG, overrides)
    if not Path(cfg.data.path).is_absolute():
        cfg.data.path = str((CONFIG.parents[2] / cfg.data.path).resolve())
    clients = [c for c in load_clients(cfg) if not c.heldout and c.train]
    chosen = sorted(random.Random(0).sample(clients, args.clients), key=lambda c: c.client_id)
    model, tokenizer = load_model(cfg.model)
    shapes = target_module_names(model, cfg.lora.targets)
    trainer = LocalTrainer(model, tokenizer, cfg.lora.targets, cfg.train)
    method = FlexLoRA()
    state = method.initial_state(shapes)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in shapes}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def fixed_batch_loss(c, deltas) -> float:
        apply_dense_delta(trainer.model, deltas, originals)
        try:
            total, count = labelled_token_loss(trainer.model, collate(tokenize_client(tokenizer, c, cfg.train)[:8], pad))
        finally:
            apply_dense_delta(trainer.model, {}, originals)
        return float(total) / count

    before = {c.client_id: fixed_batch_loss(c, {}) for c in chosen}
    rows = []
    t0 = time.time()
    for rslora in (False, True):
        for r in RANKS:
            spec = {n: ModuleSpec(rank=min(r, min(s)), alpha=cfg.lora.alpha, rslora=rslora) for n, s in shapes.items()}
            share = method.share_for(state, spec)
            for c in chosen:
                res = trainer.train_client(c, spec, share, seed=1000 + c.client_id)  # same batches for every rank
                deltas = {n: f.delta(torch.float64) for n, f in res.update.modules.items()}
                norm = math.sqrt(sum(float(d.square().sum()) for d in deltas.values()))
                after = fixed_batch_loss(c, deltas)
                rows.append({"rank": r, "rslora": rslora, "client": c.client_id, "update_norm": norm, "loss_before": before[c.client_id], "loss_after": after, "tokens": res.metrics["tokens"]})
                print(f"{'rsLoRA' if rslora else 'alpha/r':>7} r={r:<3} client {c.client_id:>5}: ||dW|| = {norm:.4f}, fixed-batch loss {before[c.client_id]:.3f} -> {after:.3f}", flush=True)
    summary = []
    for rslora in (False, True):
        for r in RANKS:
            sel = [x for x in rows if x["rank"] == r and x["rslora"] == rslora]
            summary.append({
                "scaling": "alpha/sqrt(r)" if rslora else "alpha/r", "rank": r,
                "update_norm_mean": statistics.mean(x["update_norm"] for x in sel),
                "loss_drop_mean": statistics.mean(x["loss_before"] - x["loss_after"] for x in sel),
            })
    print("\n| scaling | rank | mean ||dW||_F | mean loss drop on the client's first 8 training examples |\n|---|---|---|---|")
    for s in summary:
        print(f"| {s['scaling']} | {s['rank']} | {s['update_norm_mean']:.4f} | {s['loss_drop_mean']:.3f} |")
    write_json(RESULTS_DIR / "rank_scale_probe.json", {
        "what": __doc__.split("\n\n")[0], "clients": [c.client_id for c in chosen], "alpha": cfg.lora.alpha,
        "train": {"lr": cfg.train.lr, "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size, "max_length": cfg.train.max_length},
        "summary": summary, "rows": rows, "seconds": time.time() - t0, "environment": environment(),
    })


if __name__ == "__main__":
    main()
