"""FedIT, FlexLoRA, LoRA-FAIR and RoLoRA at the demo's scale on CPU: one seed, run by run, resumable.

The federation of ``configs/demo.toml`` (SmolLM2-135M-Instruct, the built-in task suite: 24 clients,
8 held out; 4 rounds of 4 clients, 4 local steps each; Rouge-L of generated text on 8 held-out
clients x 4 examples), plus ``eval.eval_loss = true`` for the held-out token cross-entropy. FedIT,
LoRA-FAIR and RoLoRA train at one rank for everybody (``homo``: they are defined for one rank;
RoLoRA also runs mixed ranks, row ``rolora-hts``); FlexLoRA under ``heavy-tail-strong`` as in the
demo. RoLoRA's 4 rounds are 2 of its paper's iterations (B, A, B, A). The aggregation error is the
relative Frobenius distance of the global update to the exact weighted sum ``sum_k p_k s_k B_k A_k``
of the round's client updates, averaged over modules (the round records' ``rel_error_vs_exact``).

ONE seed: 32 held-out examples decide the Rouge-L column, so differences of a few points are within
the noise (see benchmarks/results/paper_mini.md for how much one seed moves a run).

    python benchmarks/peer_methods_demo.py --run fedit      # one method (resumable at round granularity)
    python benchmarks/peer_methods_demo.py --report         # table + JSON from the finished runs

Scratch runs live under runs/peer_methods/<label>/ (not committed); a finished run's summary and
metrics are copied to benchmarks/results/peer_methods/<label>/, the table to peer_methods.md/.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

from flexlora.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"
OUT = RESULTS_DIR / "peer_methods"
SCRATCH = ROOT / "runs" / "peer_methods"
COMMON = ["eval.eval_loss=true"]
RUNS: dict[str, tuple[str, list[str]]] = {  # label -> (table row, overrides of configs/demo.toml)
    "fedit": ("FedIT (homo)", ['federation.aggregation="fedavg"', 'resources.distribution="homo"']),
    "flexlora": ("FlexLoRA (heavy-tail-strong)", ['federation.aggregation="flexlora"', 'resources.distribution="heavy-tail-strong"']),
    "lora_fair": ("LoRA-FAIR (homo)", ['federation.aggregation="lora_fair"', 'resources.distribution="homo"']),
    "rolora": ("RoLoRA (homo)", ['federation.aggregation="rolora"', 'resources.distribution="homo"']),
    "rolora-hts": ("RoLoRA (heavy-tail-strong)", ['federation.aggregation="rolora"', 'resources.distribution="heavy-tail-strong"']),
}


def run_one(label: str) -> None:
    from flexlora.simulate import Simulation

    done = OUT / label / "summary.json"
    if done.exists():
        print(f"{label}: already finished ({done.relative_to(ROOT)})")
        return
    cfg = load_config(DEMO, [*COMMON, *RUNS[label][1]])
    cfg.name = label
    scratch = SCRATCH / label
    sim = Simulation(cfg, scratch)
    sim.run(resume=(scratch / "config.json").exists())
    OUT.joinpath(label).mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "metrics.jsonl", "config.json"):
        shutil.copyfile(scratch / name, OUT / label / name)
    print(f"{label}: finished; results in {(OUT / label).relative_to(ROOT)}")


def report() -> dict[str, Any]:
    rows = []
    for label, (row, overrides) in RUNS.items():
        folder = OUT / label
        if not (folder / "summary.json").exists():
            continue
        summary = json.loads((folder / "summary.json").read_text())
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rounds = [r for r in records if r.get("round", 0) > 0 and r.get("aggregation")]
        errors = [r["aggregation"]["rel_error_vs_exact"] for r in rounds]
        evals = [r for r in records if "eval" in r]
        rows.append(
            {
                "label": label,
                "row": row,
                "overrides": overrides,
                "rouge_l_weighted": summary.get("rouge_l_weighted"),
                "base_rouge_l_weighted": summary.get("base_rouge_l_weighted"),
                "proxy_eval_loss": summary.get("proxy_eval_loss"),
                "rel_error_vs_exact_per_round": errors,
                "rel_error_vs_exact_mean": sum(errors) / len(errors) if errors else None,
                "rouge_l_per_round": {str(r["round"]): r["eval"].get("rouge_l_weighted") for r in evals},
                "eval_loss_per_round": {str(r["round"]): r["eval"].get("proxy_eval_loss") for r in evals},
                "final_train_loss": summary.get("final_train_loss"),
                "train_seconds": summary.get("train_seconds"),
                "bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
            }
        )
    data = {"environment": environment(), "seed": 0, "seeds": 1, "config": "configs/demo.toml + " + " ".join(COMMON), "runs": rows}
    write_json(RESULTS_DIR / "peer_methods.json", data)
    lines = [
        "# FedIT, FlexLoRA, LoRA-FAIR, RoLoRA at the demo's scale (CPU, ONE seed)",
        "",
        "`python benchmarks/peer_methods_demo.py`; configs/demo.toml's federation with `eval.eval_loss = true`. "
        "Rouge-L: generated text on 8 held-out clients x 4 examples (data-size weighted), after round 4; "
        "eval loss: held-out response-token cross-entropy; aggregation error: relative distance of the global update "
        "to the exact weighted sum of the round's client updates, mean over modules and rounds (per round in the JSON). "
        "One seed and 32 examples: differences of a few Rouge-L points are within the noise.",
        "",
        "| method | Rouge-L | eval loss | aggregation error vs exact | train loss (last round) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['row']} | {fmt(r['rouge_l_weighted'], '.2f')} | {fmt(r['proxy_eval_loss'], '.4f')} | {fmt(r['rel_error_vs_exact_mean'], '.2e')} | {fmt(r['final_train_loss'], '.4f')} |")
    if rows and rows[0].get("base_rouge_l_weighted") is not None:
        lines += ["", f"Base model before training (round 0): Rouge-L {rows[0]['base_rouge_l_weighted']:.2f}."]
    (RESULTS_DIR / "peer_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", choices=sorted(RUNS), help="train and evaluate one method (resumable)")
    ap.add_argument("--report", action="store_true", help="write the table and JSON from the finished runs")
    args = ap.parse_args()
    if args.run:
        run_one(args.run)
    if args.report or not args.run:
        report()


if __name__ == "__main__":
    main()
