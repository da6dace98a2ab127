"""Reproduce the paper's comparison at CPU scale, run by run, resumable across sessions.

SmolLM2-135M-Instruct on FlexLoRA's own Natural Instructions client split (held-out clients never
train), the paper's resource types at their ranks (capped at each layer's width), the same
rounds, clients per round, local steps and so (up to the clients' sequence lengths) training
tokens for every method; generated Rouge-L on a fixed subset of held-out clients.

    python benchmarks/paper_mini.py --plan            # list the runs and count their training tokens
    python benchmarks/paper_mini.py --tier 1          # run what is missing of tier 1 (resumable)
    python benchmarks/paper_mini.py --report          # rebuild paper_mini.md / .json / .png from finished runs

Tiers: 1 = FedIT homogeneous (everyone at the smallest type's rank), HetLoRA and FlexLoRA under
heavy-tail-strong, 3 seeds each; scale = the tier-1 rows again with rsLoRA's alpha/sqrt(r), one seed
(see benchmarks/rank_scale_probe.py for why); 2 = HetLoRA and FlexLoRA under uniform and heavy-tail-light;
3 = FLoRA, rank-partition, FedAvg(SGD)+FlexLoRA and SLoRA+FlexLoRA under heavy-tail-strong;
refs = the base model and a centralised LoRA (r=8) with the same number of steps and examples.
Every finished run is written at once under benchmarks/results/paper_mini/<label>/ (summary,
metrics, config); scratch folders with checkpoints live under runs/paper_mini/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

from flexlora.config import RunConfig, deep_merge, from_dict, load_config_dict, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "paper_mini.toml"
OUT = RESULTS_DIR / "paper_mini"
SCRATCH = ROOT / "runs" / "paper_mini"
DISTS = {"uniform": "uniform", "htl": "heavy-tail-light", "hts": "heavy-tail-strong"}


@dataclass
class Run:
    label: str
    tier: str
    row: str  # row of the table
    column: str  # distribution column ("all" for homogeneous runs)
    seed: int
    changes: dict[str, Any]


def matrix(seeds: list[int]) -> list[Run]:
    runs: list[Run] = []
    for seed in seeds:
        runs.append(Run(f"fedit-homo-s{seed}", "1", "FedIT (homogeneous r=8)", "all", seed, {"federation": {"aggregation": "fedavg"}, "resources": {"distribution": "homo"}}))
        for method, row in (("hetlora", "FedIT + HetLoRA"), ("flexlora", "FedIT + FlexLoRA")):
            runs.append(Run(f"{method}-hts-s{seed}", "1", row, "heavy-tail-strong", seed, {"federation": {"aggregation": method}, "resources": {"distribution": "heavy-tail-strong"}}))
    for method, row, dist in (("fedit", "FedIT (homogeneous r=8)", "homo"), ("hetlora", "FedIT + HetLoRA", "heavy-tail-strong"), ("flexlora", "FedIT + FlexLoRA", "heavy-tail-strong")):
        # the scale ablation: with alpha/r a rank-200 client learns no more in 3 steps than a rank-8 one
        # (benchmarks/rank_scale_probe.py); rsLoRA's alpha/sqrt(r) lets the larger ranks count
        short = "homo" if dist == "homo" else "hts"
        changes = {"federation": {"aggregation": "fedavg" if method == "fedit" else method}, "resources": {"distribution": dist}, "lora": {"rslora": True}}
        runs.append(Run(f"{method}-{short}-rslora-s0", "scale", row + " [rsLoRA]", "all" if dist == "homo" else dist, 0, changes))
    for short in ("uniform", "htl"):
        for method, row in (("hetlora", "FedIT + HetLoRA"), ("flexlora", "FedIT + FlexLoRA")):
            runs.append(Run(f"{method}-{short}-s0", "2", row, DISTS[short], 0, {"federation": {"aggregation": method}, "resources": {"distribution": DISTS[short]}}))
    hts = {"resources": {"distribution": "heavy-tail-strong"}}
    runs.append(Run("flora-hts-s0", "3", "FedIT + FLoRA", "heavy-tail-strong", 0, deep_merge(hts, {"federation": {"aggregation": "flora"}})))
    runs.append(Run("rank_partition-hts-s0", "3", "FedIT + rank-partition", "heavy-tail-strong", 0, deep_merge(hts, {"federation": {"aggregation": "rank_partition"}})))
    runs.append(
        Run("fedavg_sgd-flexlora-hts-s0", "3", "FedAvg(SGD) + FlexLoRA", "heavy-tail-strong", 0, deep_merge(hts, {"federation": {"aggregation": "flexlora", "algorithm": "fedavg_sgd"}, "train": {"lr": 1e-2}}))
    )
    runs.append(
        Run("fedavg_sgd-homo-s0", "3", "FedAvg(SGD) (homogeneous r=8)", "all", 0, {"federation": {"aggregation": "fedavg", "algorithm": "fedavg_sgd"}, "resources": {"distribution": "homo"}, "train": {"lr": 1e-2}})
    )
    runs.append(Run("slora-flexlora-hts-s0", "3", "SLoRA + FlexLoRA", "heavy-tail-strong", 0, deep_merge(hts, {"federation": {"aggregation": "flexlora", "algorithm": "slora"}})))
    return runs


def build_config(base: dict[str, Any], run: Run, data_path: str | None) -> RunConfig:
    data = deep_merge(base, run.changes)
    data = deep_merge(data, {"federation": {"seed": run.seed}, "name": run.label})
    if data_path:
        data = deep_merge(data, {"data": {"path": data_path}})
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def finished(label: str) -> dict[str, Any] | None:
    path = OUT / label / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def global_update_norm(scratch: Path) -> float | None:
    """||Delta W||_F over all target modules of a finished run's final global update (how far the
    federation moved the model from the base), or None when the run has no final adapter."""
    from flexlora.lowrank import factored_fro_norm
    from flexlora.peft_io import read_adapter

    folder = scratch / "final" / "global"
    if not folder.is_dir():
        return None
    adapter = read_adapter(folder)
    total = sum((f.scale * factored_fro_norm(f.B.double(), f.A.double())) ** 2 for f in adapter.modules.values())
    return math.sqrt(total)  # global/ includes FLoRA's merges into the base weights


def publish(label: str, scratch: Path, extra: dict[str, Any]) -> None:
    """Copy a finished run's small files into the committed results folder."""
    dest = OUT / label
    tmp = OUT / f".{label}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("metrics.jsonl", "config.json"):
        if (scratch / name).exists():
            shutil.copy2(scratch / name, tmp / name)
    summary = json.loads((scratch / "summary.json").read_text()) if (scratch / "summary.json").exists() else {}
    summary.update(extra)
    summary["global_update_norm"] = global_update_norm(scratch)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    for ckpt in scratch.glob("checkpoint*.pt"):  # the run is finished and published: free the disk (GBs per run)
        ckpt.unlink()


# -- token planning -----------------------------------------------------------------------------
def plan_tokens(cfg: RunConfig, clients, tokenizer) -> int:
    from flexlora.rounds import sample_clients
    from flexlora.seeds import derived_seed
    from flexlora.train import planned_tokens

    train = [c for c in clients if not c.heldout and c.train]  # sampling needs no model
    total = 0
    for rnd in range(1, cfg.federation.rounds + 1):
        for c in sample_clients(train, cfg.federation, rnd):
            total += planned_tokens(tokenizer, c, cfg.train, derived_seed(cfg.federation.seed, "train", rnd, c.client_id))
    return total


# -- references ---------------------------------------------------------------------------------
def centralised_client(cfg: RunConfig, clients):
    """One pooled client holding as many examples as the federated runs see, drawn uniformly."""
    from flexlora.data.types import ClientData

    n = cfg.federation.rounds * cfg.federation.clients_per_round * cfg.train.max_steps * cfg.train.batch_size
    pool = [ex for c in clients if not c.heldout for ex in c.train]
    sample = random.Random(0).sample(pool, n)
    return ClientData(client_id=-1, category="pooled", train=sample, eval=[], num_train_full=len(sample))


def run_centralised(base: dict[str, Any], model, tokenizer, clients, data_path) -> None:
    from flexlora.simulate import Simulation

    label = "centralised-r8"
    cfg0 = build_config(base, Run(label, "ref", "", "", 0, {}), data_path)
    steps = cfg0.federation.rounds * cfg0.federation.clients_per_round * cfg0.train.max_steps
    changes = {"federation": {"aggregation": "fedavg", "rounds": 1, "clients_per_round": 1}, "resources": {"distribution": "homo"}, "train": {"max_steps": steps}, "eval": {"every": 0}}
    cfg = build_config(base, Run(label, "ref", "Centralised LoRA r=8", "all", 0, changes), data_path)
    pooled = centralised_client(cfg0, clients)
    scratch = SCRATCH / label
    t0 = time.time()
    summary = Simulation(cfg, scratch, model=model, tokenizer=tokenizer, clients=[pooled] + [c for c in clients if c.heldout], progress=True).run(resume=True)
    publish(label, scratch, {"tier": "ref", "row": "Centralised LoRA r=8 (same steps and examples)", "column": "all", "seed": 0, "wall_seconds": time.time() - t0})
    del summary


def run_base_eval(base: dict[str, Any], model, tokenizer, clients, data_path) -> None:
    from flexlora.evaluate import evaluate_clients
    from flexlora.simulate import Simulation

    cfg = build_config(base, Run("base", "ref", "", "", 0, {}), data_path)
    sim = Simulation(cfg, SCRATCH / "base", model=model, tokenizer=tokenizer, clients=clients, progress=True)
    t0 = time.time()
    result = evaluate_clients(model, tokenizer, sim.server.fed.eval_clients, cfg.eval, progress=True).to_dict()
    OUT.mkdir(parents=True, exist_ok=True)
    dest = OUT / "base"
    dest.mkdir(exist_ok=True)
    summary = {
        "name": "base", "tier": "ref", "row": "Base model (no fine-tuning)", "column": "all", "seed": 0,
        "rouge_l_weighted": result["rouge_l_weighted"], "rouge_l_mean": result["rouge_l_mean"], "wall_seconds": time.time() - t0,
        "eval_clients": len(sim.server.fed.eval_clients), "tokens": 0,
    }
    (dest / "metrics.jsonl").write_text(json.dumps({"round": 0, "eval": result}, sort_keys=True) + "\n")
    (dest / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


# -- report -------------------------------------------------------------------------------------
def _eval_rows(label: str) -> list[dict[str, Any]]:
    path = OUT / label / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_eval(label: str) -> dict[str, Any] | None:
    evals = [r["eval"] for r in _eval_rows(label) if "eval" in r]
    return evals[-1] if evals else None


def run_seconds(label: str) -> float:
    """Training + aggregation + diagnostics + evaluation seconds summed over rounds (from metrics.jsonl):
    unlike the process wall time it survives resumption and excludes time the process was paused."""
    return sum(sum(r.get("timings", {}).values()) + r.get("eval", {}).get("seconds", 0.0) for r in _eval_rows(label))


def _t_test_df(d: list[float]) -> dict[str, float] | None:
    """Paired t-test over seeds; exact two-sided p for the small df we have (df=1: Cauchy, df=2: closed form)."""
    n = len(d)
    if n < 2:
        return None
    mean, sd = statistics.mean(d), statistics.stdev(d)
    if sd == 0:
        return {"n": n, "mean_diff": mean, "t": math.inf, "p_two_sided": 0.0 if mean else 1.0}
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    if df == 1:
        p = 1 - 2 * math.atan(abs(t)) / math.pi
    elif df == 2:
        p = 1 - abs(t) / math.sqrt(t * t + 2)
    else:  # normal approximation for larger df (report says so)
        p = math.erfc(abs(t) / math.sqrt(2))
    return {"n": n, "mean_diff": mean, "t": t, "p_two_sided": p, "df": df}


def _sign_flip_test(diffs: list[float], seed: int = 0, draws: int = 20000) -> float:
    """Two-sided paired permutation (sign-flip) test of mean difference = 0 (Monte Carlo)."""
    if not diffs:
        return float("nan")
    observed = abs(sum(diffs))
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12 for _ in range(draws))
    return (hits + 1) / (draws + 1)


def significance(a_prefix: str, b_prefix: str, seeds: list[int]) -> dict[str, Any]:
    """b - a, paired by seed (seed means) and by (seed, held-out client)."""
    seed_diffs, client_diffs = [], []
    for s in seeds:
        ea, eb = _final_eval(f"{a_prefix}-s{s}"), _final_eval(f"{b_prefix}-s{s}")
        if ea is None or eb is None:
            continue
        seed_diffs.append(eb["rouge_l_weighted"] - ea["rouge_l_weighted"])
        ca = {c["client_id"]: c["rouge_l"] for c in ea["per_client"]}
        cb = {c["client_id"]: c["rouge_l"] for c in eb["per_client"]}
        client_diffs += [cb[k] - ca[k] for k in sorted(ca) if k in cb]
    return {
        "comparison": f"{b_prefix} minus {a_prefix}",
        "seeds": len(seed_diffs),
        "seed_diffs": seed_diffs,
        "paired_t_over_seeds": _t_test_df(seed_diffs),
        "client_pairs": len(client_diffs),
        "client_mean_diff": statistics.mean(client_diffs) if client_diffs else None,
        "sign_flip_p_over_client_pairs": _sign_flip_test(client_diffs) if client_diffs else None,
    }


def report(runs: list[Run], seeds: list[int]) -> None:
    rows: dict[str, dict[str, list[float]]] = {}
    raw: list[dict[str, Any]] = []
    for r in runs:
        s = finished(r.label)
        if s is None:
            continue
        raw.append(s)
        if s.get("rouge_l_weighted") is not None:
            rows.setdefault(r.row, {}).setdefault(r.column, []).append(s["rouge_l_weighted"])
    refs = {lab: finished(lab) for lab in ("base", "centralised-r8")}
    columns = ["uniform", "heavy-tail-light", "heavy-tail-strong"]

    def cell(vals: list[float] | None) -> str:
        if not vals:
            return "–"
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"

    lines = [
        "# Paper-mini: held-out zero-shot Rouge-L (generated text, data-size weighted)",
        "",
        "SmolLM2-135M-Instruct on FlexLoRA's NI client split; laid out like the paper's Table 2 "
        "(rows: base algorithm + aggregation, columns: resource distribution). Homogeneous rows do not "
        "depend on the distribution (everyone at rank 8) and are repeated in every column. Mean ± std over seeds where there are several.",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row, cols in rows.items():
        lines.append(f"| {row} | " + " | ".join(cell(cols.get("all") or cols.get(c)) for c in columns) + " |")
    for lab, s in refs.items():
        if s:
            lines.append(f"| *reference: {s.get('row', lab)}* | " + " | ".join(cell([s["rouge_l_weighted"]]) for _ in columns) + " |")
    sig = (
        significance("fedit-homo", "flexlora-hts", seeds),
        significance("hetlora-hts", "flexlora-hts", seeds),
        significance("fedit-homo-rslora", "flexlora-hts-rslora", [0]),
        significance("hetlora-hts-rslora", "flexlora-hts-rslora", [0]),
        significance("hetlora-uniform", "flexlora-uniform", [0]),
        significance("fedit-homo", "flexlora-uniform", [0]),
        significance("hetlora-htl", "flexlora-htl", [0]),
        significance("fedit-homo", "flexlora-htl", [0]),
        significance("flora-hts", "flexlora-hts", [0]),
        significance("rank_partition-hts", "flexlora-hts", [0]),
        significance("fedavg_sgd-homo", "fedavg_sgd-flexlora-hts", [0]),
        significance("flexlora-hts", "slora-flexlora-hts", [0]),
    )
    lines += ["", "## Significance", "",
              "Tier 1 (heavy-tail-strong) is paired over 3 seeds and over (seed, held-out client) pairs; the one-seed rows "
              "(rsLoRA ablation, tiers 2 and 3) only over the 32 held-out clients of seed 0, which says nothing about "
              "seed-to-seed variation: FlexLoRA heavy-tail-strong alone spans 7.92-13.42 over three seeds.", ""]
    for s in sig:
        if not s["seeds"]:
            continue
        t = s["paired_t_over_seeds"]
        lines.append(
            f"- {s['comparison']}: seed differences {['%.2f' % d for d in s['seed_diffs']]}; "
            + (f"paired t over {t['n']} seeds t = {t['t']:.2f}, p = {t['p_two_sided']:.3f}; " if t else "fewer than 2 paired seeds; ")
            + (f"over {s['client_pairs']} (seed, client) pairs mean {s['client_mean_diff']:.2f}, sign-flip p = {s['sign_flip_p_over_client_pairs']:.3f}" if s["client_pairs"] else "")
        )
    lines += ["", "## Runs", "", "*final ‖ΔW‖_F*: Frobenius norm, over all target modules, of the final global update (how far the federation moved the base model); *run s*: training + aggregation + evaluation seconds from metrics.jsonl (2 cores; other work sometimes ran beside it).", "", "| run | tier | tokens | rounds | train loss | Rouge-L (weighted) | Rouge-L (mean) | teacher-forced proxy | eval loss proxy | final ‖ΔW‖_F | run s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in raw:
        ev = _final_eval(s["name"]) or {}
        f = lambda x, p=2: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
        lines.append(
            f"| {s['name']} | {s.get('tier')} | {s.get('tokens')} | {s.get('rounds')} | {f(s.get('final_train_loss'), 3)} | {f(s.get('rouge_l_weighted'))} | {f(s.get('rouge_l_mean'))} | "
            f"{f(ev.get('proxy_teacher_forced_rouge_l_weighted'))} | {f(ev.get('proxy_eval_loss'), 3)} | {f(s.get('global_update_norm'), 3)} | {run_seconds(s['name']):.0f} |"
        )
    lines += category_table(runs) + diagnostics_table(runs)
    missing = [r.label for r in runs if finished(r.label) is None]
    if missing:
        lines += ["", f"Not yet run ({len(missing)}): " + ", ".join(missing)]
    OUT.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "paper_mini.md").write_text("\n".join(lines) + "\n")
    write_json(RESULTS_DIR / "paper_mini.json", {"runs": raw, "references": refs, "significance": list(sig), "missing": missing, "environment": environment()})
    plot(runs, seeds)
    print("\n".join(lines))


def _group(label: str) -> str:
    """Run label without its seed suffix: the unit of a table column."""
    return label.rsplit("-s", 1)[0] if label.rsplit("-s", 1)[-1].isdigit() else label


def category_table(runs: list[Run]) -> list[str]:
    """Final held-out Rouge-L per task category (weighted within the category), mean over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for label in ["base", "centralised-r8"] + [r.label for r in runs]:
        ev = _final_eval(label) if finished(label) else None
        if ev and ev.get("per_category"):
            groups.setdefault(_group(label), []).append(ev["per_category"])
    if not groups:
        return []
    cats = sorted({c for evs in groups.values() for pc in evs for c in pc})
    sizes = {c: next(pc[c] for evs in groups.values() for pc in evs if c in pc) for c in cats}
    names = list(groups)
    lines = ["", "## Per category (final round; mean over seeds)", "",
             "Categories of the fixed evaluation subset, with its held-out clients / examples. Rouge-score's default tokenizer drops "
             "non-ASCII text, so translation into non-Latin scripts scores 0 whatever the model writes.", "",
             "| category | clients / examples | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for c in cats:
        vals = [statistics.mean(pc[c]["rouge_l_weighted"] for pc in groups[g] if c in pc) for g in names]
        lines.append(f"| {c} | {sizes[c]['num_clients']} / {sizes[c]['num_examples']} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return lines


def diagnostics_table(runs: list[Run]) -> list[str]:
    """What the server did to the clients' updates, averaged over rounds and seeds (from metrics.jsonl)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for rec in _eval_rows(r.label):
            a = rec.get("aggregation")
            if not a:
                continue
            d = acc.setdefault(_group(r.label), {})
            d.setdefault("rel", []).append(a.get("rel_error_vs_exact", float("nan")))
            d.setdefault("max_rel", []).append(a.get("max_rel_error_vs_exact", float("nan")))
            d.setdefault("eff", []).append(a.get("effective_rank", float("nan")))
            for k, v in (a.get("truncation_error") or {}).items():
                d.setdefault(f"trunc{k}", []).append(v)
    if not acc:
        return []
    ranks = sorted({int(k[5:]) for d in acc.values() for k in d if k.startswith("trunc")})
    lines = ["", "## Aggregation diagnostics (mean over rounds and seeds)", "",
             "*error vs exact*: relative Frobenius distance of the aggregate from the exact data-weighted average of the clients' "
             "products s·B·A (mean over modules / worst module); *effective rank*: of the aggregate (entropy of its singular "
             "values); *rank-r error @r*: relative error of the best rank-r approximation of the aggregate, i.e. what a FlexLoRA "
             "share of that rank loses (a HetLoRA share, the first r columns, loses at least this). The runs here measured "
             "distances with a Gram-trace norm whose float64 floor is ~1e-8 relative (replaced by a QR-based one since), "
             "so FlexLoRA's values between 1e-15 and 1e-8 all mean exact.", "",
             "| run | error vs exact (mean / max) | effective rank | " + " | ".join(f"rank-r error @{k}" for k in ranks) + " |",
             "|---|---|---|" + "---|" * len(ranks)]
    for g, d in acc.items():
        trunc = [f"{statistics.mean(d[f'trunc{k}']):.3f}" if d.get(f"trunc{k}") else "–" for k in ranks]
        lines.append(f"| {g} | {statistics.mean(d['rel']):.3g} / {statistics.mean(d['max_rel']):.3g} | {statistics.mean(d['eff']):.1f} | " + " | ".join(trunc) + " |")
    return lines


TIER1_CURVES = [("fedit-homo", "FedIT, everyone r=8", "homo"), ("hetlora-hts", "FedIT + HetLoRA", "hetlora"),
                ("flexlora-hts", "FedIT + FlexLoRA", "flexlora")]
# (title, [(run label; without -s<seed> it is averaged over seeds, legend, colour key, line style)])
PANELS: list[tuple[str, list[tuple[str, str, str, str]]]] = [
    ("Tier 1: heavy-tail-strong (mean ± std over seeds)", [(lab, leg, key, "-") for lab, leg, key in TIER1_CURVES]),
    ("Scale: rsLoRA (solid) vs alpha/r (dotted), seed 0",
     [(f"{lab}-rslora-s0", leg, key, "-") for lab, leg, key in TIER1_CURVES] + [(f"{lab}-s0", "", key, ":") for lab, _, key in TIER1_CURVES]),
    ("Tier 2: distributions, seed 0 (uniform --, light -., strong -)", [("fedit-homo-s0", "FedIT, everyone r=8", "homo", "-")] + [
        (f"{method}-{dist}-s0", legend if dist == "uniform" else "", method, ls)
        for method, legend in (("hetlora", "HetLoRA"), ("flexlora", "FlexLoRA"))
        for dist, ls in (("uniform", "--"), ("htl", "-."), ("hts", "-"))
    ]),
    ("Tier 3: heavy-tail-strong, seed 0", [
        ("flexlora-hts-s0", "FedIT + FlexLoRA", "flexlora", "-"),
        ("flora-hts-s0", "FedIT + FLoRA", "flora", "-"),
        ("rank_partition-hts-s0", "FedIT + rank-partition", "rank_partition", "-"),
        ("slora-flexlora-hts-s0", "SLoRA + FlexLoRA", "slora", "-"),
        ("fedavg_sgd-flexlora-hts-s0", "FedAvg(SGD) + FlexLoRA", "sgd_flexlora", "-"),
        ("fedavg_sgd-homo-s0", "FedAvg(SGD), everyone r=8", "sgd_homo", "-"),
    ]),
]
COLORS = {"homo": "tab:blue", "hetlora": "tab:orange", "flexlora": "tab:green", "flora": "tab:red",
          "rank_partition": "tab:purple", "slora": "tab:brown", "sgd_flexlora": "tab:olive", "sgd_homo": "tab:cyan"}


def _curve(label: str, seeds: list[int]) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and std of held-out Rouge-L over the seeds that have ``label`` (or the pinned label)."""
    labels = [label] if re.search(r"-s\d+$", label) else [f"{label}-s{s}" for s in seeds]
    per_round: dict[int, list[float]] = {}
    for lab in labels:
        for rec in _eval_rows(lab):
            if "eval" in rec:
                per_round.setdefault(rec["round"], []).append(rec["eval"]["rouge_l_weighted"])
    xs = sorted(per_round)
    return xs, [statistics.mean(per_round[x]) for x in xs], [statistics.stdev(per_round[x]) if len(per_round[x]) > 1 else 0.0 for x in xs]


def plot(runs: list[Run], seeds: list[int]) -> None:
    """One panel per question (tier 1, scale, distributions, peers): one plot of 17 curves is unreadable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, cen = finished("base"), finished("centralised-r8")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharey=True)
    drew = False
    for ax, (title, curves) in zip(axes.flat, PANELS):
        for label, legend, key, ls in curves:
            xs, ys, sd = _curve(label, seeds)
            if not xs:
                continue
            drew = True
            if base:
                xs, ys, sd = [0] + xs, [base["rouge_l_weighted"]] + ys, [0.0] + sd
            ax.plot(xs, ys, marker="o", ms=4, ls=ls, color=COLORS[key], label=legend or None)
            if any(sd):
                ax.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)], color=COLORS[key], alpha=0.15)
        if cen and cen.get("rouge_l_weighted") is not None:
            ax.axhline(cen["rouge_l_weighted"], color="grey", ls="--", lw=1, label="centralised r=8")
        if base:
            ax.axhline(base["rouge_l_weighted"], color="grey", ls=":", lw=1, label="base model")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if not drew:
        plt.close(fig)
        return
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out Rouge-L (weighted)")
    fig.suptitle("Paper-mini: zero-shot Rouge-L on 32 held-out NI clients, SmolLM2-135M, ~108k training tokens per run")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "paper_mini.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", default="1", help="1, scale, 2, 3, refs, or all (comma-separated)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", help="run only these labels (comma-separated)")
    ap.add_argument("--data", help="NI data path (default: the config's ../shared path)")
    ap.add_argument("--plan", action="store_true", help="list runs and count their training tokens; train nothing")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = matrix(seeds)
    tiers = set(args.tier.split(","))
    if args.report:
        report(runs, seeds)
        return
    base = load_config_dict(BASE_CONFIG)
    path = Path(base["data"]["path"])
    base["data"]["path"] = args.data or str(path if path.is_absolute() else (ROOT / path).resolve())
    selected = [r for r in runs if ("all" in tiers or r.tier in tiers) and (not args.only or r.label in args.only.split(","))]

    from flexlora.models import load_model
    from flexlora.data.clients import load_clients
    from flexlora.simulate import Simulation

    cfg0 = build_config(base, runs[0], None)
    clients = load_clients(cfg0)
    model, tokenizer = load_model(cfg0.model)
    if args.plan:
        for r in selected:
            cfg = build_config(base, r, None)
            print(f"{r.label:<32} tier {r.tier}  {plan_tokens(cfg, clients, tokenizer):>8} training tokens")
        return
    if "refs" in tiers or "all" in tiers:
        if finished("base") is None:
            run_base_eval(base, model, tokenizer, clients, None)
        if finished("centralised-r8") is None:
            run_centralised(base, model, tokenizer, clients, None)
        report(runs, seeds)
    for r in selected:
        if finished(r.label) is not None:
            print(f"{r.label}: done, skipped")
            continue
        cfg = build_config(base, r, None)
        scratch = SCRATCH / r.label
        t0, cpu0 = time.time(), time.process_time()
        try:
            sim = Simulation(cfg, scratch, model=model, tokenizer=tokenizer, clients=clients, progress=True)
        except ValueError as e:  # e.g. an algorithm this version does not implement yet
            print(f"{r.label}: cannot run: {e}")
            continue
        try:
            sim.run(resume=True)
        finally:
            sim.server.restore_base()
        model = sim.server.model
        publish(r.label, scratch, {"tier": r.tier, "row": r.row, "column": r.column, "seed": r.seed, "wall_seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0, "planned_tokens_note": "tokens = real (non-padding) tokens processed"})
        report(runs, seeds)


if __name__ == "__main__":
    main()
