"""Zero-shot Rouge-L of the base SmolLM2-135M-Instruct on held-out NI clients: Alpaca vs chat template.

The "before" line of every comparison. Same fixed subset of held-out clients as
benchmarks/paper_mini.py (32 clients drawn with seed 0 from heldout_clients.json, 3 eval
examples each, greedy, up to 48 new tokens), so the numbers are directly comparable.

    python benchmarks/base_model_eval.py [--clients N] [--examples K]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

from flexlora.config import load_config  # noqa: E402
from flexlora.evaluate import evaluate_clients  # noqa: E402
from flexlora.models import load_model  # noqa: E402
from flexlora.data.clients import load_clients  # noqa: E402
from flexlora.simulate import Simulation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).resolve().parent / "configs" / "paper_mini.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flexlora-ni" / "clients.jsonl.gz"))
    args = ap.parse_args()
    cfg = load_config(CONFIG, [f'data.path="{args.data}"', f"eval.clients={args.clients}", f"eval.examples_per_client={args.examples}"])
    model, tokenizer = load_model(cfg.model)
    clients = load_clients(cfg)
    sim = Simulation(cfg, ROOT / "runs" / "base_model_eval", model=model, tokenizer=tokenizer, clients=clients, progress=False)
    results = {}
    for template in ("alpaca", "chat"):
        ecfg = dataclasses.replace(cfg.eval, template=template)
        r = evaluate_clients(model, tokenizer, sim.server.fed.eval_clients, ecfg, progress=True).to_dict()
        results[template] = r
        print(f"{template:>6}: Rouge-L weighted {r['rouge_l_weighted']:.2f}, mean {r['rouge_l_mean']:.2f}, "
              f"teacher-forced proxy {r.get('proxy_teacher_forced_rouge_l_weighted')}, eval loss proxy {r.get('proxy_eval_loss')}")
    out = {
        "benchmark": "base_model_eval",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), no fine-tuning",
        "heldout_subset": {"clients": len(sim.server.fed.eval_clients), "client_ids": [c.client_id for c in sim.server.fed.eval_clients], "examples_per_client": args.examples, "rule": "random.Random(0).sample of the held-out clients with eval data"},
        "generation": {"greedy": True, "max_new_tokens": cfg.eval.max_new_tokens, "max_prompt_tokens": cfg.eval.max_prompt_tokens},
        "results": {t: {k: v for k, v in r.items() if k != "per_client"} | {"per_client": r["per_client"]} for t, r in results.items()},
        "summary": {t: {"rouge_l_weighted": r["rouge_l_weighted"], "rouge_l_mean": r["rouge_l_mean"]} for t, r in results.items()},
        "environment": environment(),
    }
    print(f"-> {write_json(RESULTS_DIR / 'base_model_eval.json', out)}")


if __name__ == "__main__":
    main()
