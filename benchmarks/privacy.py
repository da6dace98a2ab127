"""Utility against privacy: FlexLoRA and FedIT under central user-level DP at equal epsilon.

    python benchmarks/privacy.py            # SmolLM2-135M on the demo's federation (about an hour on 2 CPU cores)
    python benchmarks/privacy.py --quick    # the tiny random model: checks the script, numbers mean nothing

For each method: one run without DP (the DP mechanism with a clipping bound nobody reaches and no noise,
which logs the median norm of the clients' changes), then runs at three noise multipliers with the clipping bound C set
to that median. Both methods see the same sampling (Poisson, m of N per round), rounds and noise
multipliers, so the same epsilon. Writes ``benchmarks/results/privacy.json`` and ``privacy.png``
(held-out eval loss and Rouge-L against epsilon). Runs live in ``runs/privacy`` and resume.

The scale is the point to read with care: 24 clients, 4 per round, 4 rounds. Central DP needs many
clients per round (the noise std is z*C/m per entry of every full-size layer update); with m = 4 any
meaningful epsilon drowns the update, which is what this benchmark shows, not a property of FlexLoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # label -> config changes (the demo's two rows)
    "flexlora": {"federation": {"aggregation": "flexlora"}, "resources": {"distribution": "heavy-tail-strong"}},
    "fedit": {"federation": {"aggregation": "fedavg"}, "resources": {"distribution": "homo"}},
}
UNREACHED = 1e9  # a clipping bound no update reaches: the run is the no-DP run, with norms logged


def base_config(quick: bool, rounds: int) -> dict[str, Any]:
    from flexlora.config import load_config_dict

    if quick:
        base = load_config_dict(ROOT / "configs" / "smoke.toml")
    else:
        base = load_config_dict(ROOT / "configs" / "demo.toml")
        base["eval"] = {**base.get("eval", {}), "at_start": False, "every": 0}  # one evaluation, at the end
    base.pop("compare", None)
    base["eval"] = {**base.get("eval", {}), "eval_loss": True}  # the held-out loss: smoother than Rouge-L at this scale
    base["federation"] = {**base.get("federation", {}), "rounds": rounds}
    return base


def run_all(base: dict[str, Any], entries: list[dict[str, Any]], out: Path, progress: bool) -> list[dict[str, Any]]:
    from flexlora.compare import expand_runs, run_compare

    return run_compare(expand_runs({**base, "compare": entries}), out, progress=progress)


def entry(label: str, method: str, clip: float, noise: float) -> dict[str, Any]:
    e = {"label": label, **{k: dict(v) for k, v in METHODS[method].items()}}
    e["privacy"] = {"clip_norm": clip, "noise_multiplier": noise}
    return e


def median_norm(run_dir: Path) -> float:
    import json

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [r["privacy"]["norm_median"] for r in recs if r.get("privacy", {}).get("norm_median") is not None]
    return float(f"{statistics.median(norms):.2g}")  # two digits: a bound a person would write down


def row(summary: dict[str, Any], method: str, noise: float, clip: float, run_dir: Path) -> dict[str, Any]:
    import json

    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["round"] > 0 and "aggregation" in r and r.get("aggregation")]
    pv = summary.get("privacy") or {}
    return {
        "method": method,
        "noise_multiplier": noise,
        "clip_norm": None if clip == UNREACHED else clip,
        "epsilon": pv.get("epsilon"),
        "delta": pv.get("delta"),
        "rouge_l_weighted": summary["rouge_l_weighted"],
        "proxy_eval_loss": summary["proxy_eval_loss"],
        "final_train_loss": summary["final_train_loss"],
        "clipped_fraction": pv["clipped_updates"] / pv["updates"] if pv.get("updates") else None,
        "clients_per_round": [len(r["clients"]) for r in recs if r["round"] > 0],
        # how far the released aggregate is from the clipped sum (the noise's relative size)
        "mean_rel_distance_from_clipped_sum": statistics.mean(r["aggregation"]["rel_error_vs_exact"] for r in rounds) if rounds else None,
        "train_seconds": summary["train_seconds"],
        "run": run_dir.name,  # under --out (no machine paths in results)
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "proxy_eval_loss", "held-out eval loss (teacher-forced)"), (axes[1], "rouge_l_weighted", "held-out Rouge-L")):
        for i, method in enumerate(METHODS):
            mine = [r for r in rows if r["method"] == method]
            dp = sorted((r["epsilon"], r[key]) for r in mine if r["epsilon"] is not None and r[key] is not None)
            color = f"C{i}"
            if dp:
                ax.plot([e for e, _ in dp], [v for _, v in dp], "o-", color=color, label=f"{method} (DP)")
            for r in mine:
                if r["epsilon"] is None and r[key] is not None:
                    ax.axhline(r[key], color=color, linestyle="--", label=f"{method}, no DP")
        ax.set_xscale("log")
        if not ax.lines:
            continue
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny random model (checks the script; numbers mean nothing)")
    ap.add_argument("--noise", type=float, nargs=3, default=[0.5, 1.0, 2.0], help="three noise multipliers")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="runs/privacy", help="where the runs live (resumed when there)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report", action="store_true", help="run nothing: write the JSON and plot from the runs finished so far")
    args = ap.parse_args()
    env = environment()
    out = Path(args.out) / ("quick" if args.quick else "smollm2")
    base = base_config(args.quick, args.rounds)
    t0 = time.time()
    baselines = [entry(f"{m}-nodp", m, UNREACHED, 0.0) for m in METHODS]
    if not args.report:
        run_all(base, baselines, out, not args.quiet)
    clips = {m: median_norm(out / f"{m}-nodp") for m in METHODS}
    print(f"clipping bounds (median update norm without DP): {clips}")
    dp = [entry(f"{m}-z{z:g}", m, clips[m], z) for m in METHODS for z in args.noise]
    if not args.report:
        run_all(base, baselines + dp, out, not args.quiet)
    rows, missing = [], []
    for e in baselines + dp:  # every finished run (all of them unless --report stopped early)
        done = out / e["label"] / "summary.json"
        if not done.exists():
            missing.append(e["label"])
            continue
        method = next(m for m in METHODS if e["label"].startswith(m))
        rows.append(row(json.loads(done.read_text()), method, e["privacy"]["noise_multiplier"], e["privacy"]["clip_norm"], out / e["label"]))
    cfg_note = "tiny random model (script check only)" if args.quick else "SmolLM2-135M-Instruct, demo suite"
    fed = base["federation"]
    scale = f"{cfg_note}: {base['data'].get('suite_clients')} clients, Poisson sampling of {fed.get('clients_per_round')} per round, {fed['rounds']} rounds"
    name = "privacy_quick" if args.quick else "privacy"
    result = {
        "environment": env,
        "scale": scale,
        "clip_norms": clips,
        "rows": rows,
        "wall_seconds": None if args.report else round(time.time() - t0, 1),
        "runs_not_finished": missing,
        "note": "noise std per entry = z * C / m (m: clients per round); with m = 4 a meaningful epsilon drowns the update",
    }
    path = write_json(RESULTS_DIR / f"{name}.json", result)
    plot(rows, RESULTS_DIR / f"{name}.png", scale)
    print(f"{'run':<22} {'epsilon':>8} {'eval loss':>9} {'Rouge-L':>8} {'clipped':>8} {'rel dist':>9}")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"{r['method'] + ' z=' + format(r['noise_multiplier'], 'g'):<22} {eps:>8} {r['proxy_eval_loss'] or float('nan'):>9.3f} "
              f"{r['rouge_l_weighted'] or 0:>8.2f} {r['clipped_fraction'] if r['clipped_fraction'] is not None else float('nan'):>8.2f} {r['mean_rel_distance_from_clipped_sum'] or float('nan'):>9.3g}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
