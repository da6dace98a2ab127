"""Several runs on one config and seed, one table and one plot (``flexlora compare``).

The base model and the data are loaded once and shared, and so is the base model's round-0
evaluation where runs score it on the same examples (:mod:`flexlora.base_eval`); each run writes its own folder and is
skipped when it already finished with the same config (so a comparison can be resumed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from flexlora.base_eval import BaseEvaluations
from flexlora.config import ConfigError, RunConfig, config_fingerprint, deep_merge, from_dict, validate
from flexlora.models import load_model
from flexlora.data.clients import load_clients
from flexlora.runner import check_run
from flexlora.simulate import Simulation
from flexlora.stats import format_interval, paired_differences, record_intervals, summary_intervals


def expand_runs(base: Mapping[str, Any], methods: Sequence[str] | None = None) -> list[tuple[str, RunConfig]]:
    """(label, config) for every entry of ``compare`` (or every method in ``methods``)."""
    entries = [dict(e) for e in base.get("compare", [])]
    if methods:
        entries = [{"label": m, "federation": {"aggregation": m}} for m in methods]
    if not entries:
        raise ConfigError("nothing to compare: add [[compare]] tables to the config or pass --methods")
    runs = []
    base = {k: v for k, v in base.items() if k != "compare"}
    for i, entry in enumerate(entries):
        label = str(entry.pop("label", f"run{i}"))
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise ConfigError(f"compare[{i}].label {label!r}: use letters, digits and _ . + - only (it names a folder)")
        cfg = from_dict(RunConfig, deep_merge(base, entry))
        cfg.name = label
        validate(cfg)
        runs.append((label, cfg))
    labels = [l for l, _ in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare labels must be unique, got {labels}")
    models = {json.dumps(c.model.__dict__, sort_keys=True) for _, c in runs}
    if len(models) > 1:
        raise ConfigError("all compared runs must use the same model settings (it is loaded once)")
    return runs


def run_compare(runs: list[tuple[str, RunConfig]], out: Path, progress: bool = True) -> list[dict[str, Any]]:
    out = Path(out)
    model, tokenizer = load_model(runs[0][1].model)
    data_cache: dict[str, Any] = {}
    base_evals = BaseEvaluations()  # the base model's round-0 evaluation, scored once for the runs that share it

    def clients_of(cfg: RunConfig) -> Any:
        key = json.dumps({**cfg.data.__dict__, "seed": cfg.federation.seed}, sort_keys=True)
        if key not in data_cache:
            data_cache[key] = load_clients(cfg)
        return data_cache[key]

    for label, cfg in runs:  # every run's refusals before the first one trains
        try:
            check_run(cfg, model, clients_of(cfg))
        except ValueError as e:  # config, data and method errors alike: one line, exit 2, nothing written
            raise ConfigError(f"compare run {label!r}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for label, cfg in runs:
        run_dir = out / label
        done = run_dir / "summary.json"
        if done.exists() and (run_dir / "fingerprint").exists() and (run_dir / "fingerprint").read_text() == config_fingerprint(cfg):
            summaries.append(json.loads(done.read_text()))
            continue
        sim = Simulation(cfg, run_dir, model=model, tokenizer=tokenizer, clients=clients_of(cfg), progress=progress, base_evals=base_evals)
        try:
            summary = sim.run(resume=True)
        finally:
            sim.server.restore_base()
        model = sim.server.model
        (run_dir / "fingerprint").write_text(config_fingerprint(cfg))
        summaries.append(summary)
    add_paired_differences(summaries, [out / label for label, _ in runs])
    (out / "compare.json").write_text(json.dumps(summaries, indent=2, sort_keys=True))
    plot_runs(out, [l for l, _ in runs])
    return summaries


def _eval_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's evaluation records (round, eval) in order, from its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "eval" in r]


def add_paired_differences(summaries: list[dict[str, Any]], run_dirs: Sequence[Path]) -> None:
    """Each summary gets its figures' intervals (also a summary written before they existed) and,
    after the first, ``vs_first``: its difference to the first run with a paired bootstrap interval
    (the same held-out clients resampled for both; None where they were not scored on the same examples)."""
    lasts = []
    for summary, run_dir in zip(summaries, run_dirs):
        evals = _eval_records(run_dir)
        last = evals[-1]["eval"] if evals else None
        first = evals[0]["eval"] if evals and evals[0]["round"] == 0 else None
        summary["intervals"] = summary_intervals(last, first)
        lasts.append(last)
    if lasts and lasts[0] is not None:
        for summary, last, diff in zip(summaries[1:], lasts[1:], paired_differences([lasts[0], *[l or {} for l in lasts[1:]]])):
            summary["vs_first"] = {"run": summaries[0]["name"], **diff} if last is not None else None


def plot_runs(out: Path, labels: Sequence[str]) -> Path | None:
    """``compare.png``: see :func:`runs_figure`."""
    import matplotlib.pyplot as plt

    fig = runs_figure(out, labels)
    path = out / "compare.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def runs_figure(out: Path, labels: Sequence[str]):
    """Held-out Rouge-L (with its 95% bootstrap interval as bars and a band) and training loss per
    round for each run, side by side; rounds are whole numbers on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(labels):
        path = out / label / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ev = [(r["round"], r["eval"]["rouge_l_weighted"]) for r in recs if "eval" in r]
        intervals = {r["round"]: (r["eval"].get("intervals") or record_intervals(r["eval"])).get("rouge_l_weighted") for r in recs if "eval" in r}
        loss = [(r["round"], r["train_loss"]) for r in recs if r.get("train_loss") is not None]
        if ev:
            (line,) = ax_r.plot(*zip(*ev), marker="o", label=label)
            known = [(rnd, y, intervals[rnd]) for rnd, y in ev if intervals.get(rnd) is not None]
            if known:
                shift = (i - (len(labels) - 1) / 2) * 0.06  # side by side, so the bars of different runs do not hide each other
                ax_r.errorbar([rnd + shift for rnd, _, _ in known], [y for _, y, _ in known], yerr=[[y - iv[0] for _, y, iv in known], [iv[1] - y for _, y, iv in known]],
                              fmt="none", ecolor=line.get_color(), alpha=0.7, capsize=3)
                ax_r.fill_between([rnd for rnd, _, _ in known], [iv[0] for _, _, iv in known], [iv[1] for _, _, iv in known], color=line.get_color(), alpha=0.12, linewidth=0)
        if loss:
            ax_l.plot(*zip(*loss), marker=".", label=label)
    ax_r.set(title="Zero-shot Rouge-L on held-out clients (weighted; 95% interval)", xlabel="round", ylabel="Rouge-L")
    ax_l.set(title="Local training loss (mean over clients)", xlabel="round", ylabel="loss")
    for ax in (ax_r, ax_l):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one round in view still gets whole-number ticks
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _epsilon(summary: Mapping[str, Any]) -> str:
    """epsilon at delta for a DP run, "clip" for clipping alone, "-" without either."""
    pv = summary.get("privacy")
    if not pv:
        return "-"
    if "epsilon" not in pv:
        return "clip"
    return f"{pv['epsilon']:.2f} (d={pv['delta']:.0e})"


def _difference(summary: Mapping[str, Any], figure: str, digits: int) -> str:
    vs = summary.get("vs_first") or {}
    d = vs.get(figure)
    return "-" if d is None else format_interval(d["difference"], [d["low"], d["high"]], digits, signed=True)


def print_table(summaries: Sequence[dict[str, Any]], title: str = "flexlora compare") -> None:
    """One row per run; every held-out figure with its 95% bootstrap interval in brackets and, after
    the first run, its paired difference to the first run."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    paired = [f for f in ("rouge_l_weighted", "proxy_eval_loss") if any((s.get("vs_first") or {}).get(f) for s in summaries)]
    figures = ("Rouge-L base", "Rouge-L final", "diff Rouge-L", "eval loss", "diff eval loss")
    for col in ("run", "aggregation", "ranks", "rounds", "tokens", "train loss", "Rouge-L base", "Rouge-L final",
                *(["diff Rouge-L"] if "rouge_l_weighted" in paired else []), "eval loss",
                *(["diff eval loss"] if "proxy_eval_loss" in paired else []), "epsilon", "train s"):
        table.add_column(col, justify="right" if col not in ("run", "aggregation", "ranks") else "left", no_wrap=col in figures or col in ("run", "aggregation", "ranks"))
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for s in summaries:
        iv = s.get("intervals") or {}
        row = [
            s["name"], s["aggregation"], s["distribution"], str(s["rounds"]), str(s["tokens"]), fmt(s["final_train_loss"], 3),
            format_interval(s["base_rouge_l_weighted"], iv.get("base_rouge_l_weighted")), format_interval(s["rouge_l_weighted"], iv.get("rouge_l_weighted")),
        ]
        if "rouge_l_weighted" in paired:
            row.append(_difference(s, "rouge_l_weighted", 2))
        row.append(format_interval(s["proxy_eval_loss"], iv.get("proxy_eval_loss"), 3))
        if "proxy_eval_loss" in paired:
            row.append(_difference(s, "proxy_eval_loss", 3))
        table.add_row(*(escape(c) for c in row), _epsilon(s), fmt(s["train_seconds"], 0))
    meta = next((s["intervals"]["interval"] for s in summaries if s.get("intervals")), None)
    if meta:
        table.caption = escape(
            f"[low, high]: {meta['level']:.0%} bootstrap interval over the {meta['units']} held-out {meta['unit']}s"
            + (f"; diff: paired difference to the first run, {summaries[0]['name']}, on the same examples" if paired else "")
        )
    import sys

    Console(width=None if sys.stdout.isatty() else 240).print(table)  # logs and CI: do not squeeze to 80 columns
