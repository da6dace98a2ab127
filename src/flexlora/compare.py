"""Several runs on one config and seed, one table and one plot (``flexlora compare``).

The base model and the data are loaded once and shared; each run writes its own folder and is
skipped when it already finished with the same config (so a comparison can be resumed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from flexlora.config import ConfigError, RunConfig, deep_merge, from_dict, validate
from flexlora.models import load_model
from flexlora.simulate import Simulation, check_run, config_fingerprint, load_clients


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
        sim = Simulation(cfg, run_dir, model=model, tokenizer=tokenizer, clients=clients_of(cfg), progress=progress)
        try:
            summary = sim.run(resume=True)
        finally:
            sim.restore_base()
        model = sim.model
        (run_dir / "fingerprint").write_text(config_fingerprint(cfg))
        summaries.append(summary)
    (out / "compare.json").write_text(json.dumps(summaries, indent=2, sort_keys=True))
    plot_runs(out, [l for l, _ in runs])
    return summaries


def plot_runs(out: Path, labels: Sequence[str]) -> Path | None:
    """Held-out Rouge-L and training loss per round for each run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        path = out / label / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ev = [(r["round"], r["eval"]["rouge_l_weighted"]) for r in recs if "eval" in r]
        loss = [(r["round"], r["train_loss"]) for r in recs if r.get("train_loss") is not None]
        if ev:
            ax_r.plot(*zip(*ev), marker="o", label=label)
        if loss:
            ax_l.plot(*zip(*loss), marker=".", label=label)
    ax_r.set(title="Zero-shot Rouge-L on held-out clients (weighted)", xlabel="round", ylabel="Rouge-L")
    ax_l.set(title="Local training loss (mean over clients)", xlabel="round", ylabel="loss")
    for ax in (ax_r, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _epsilon(summary: Mapping[str, Any]) -> str:
    """epsilon at delta for a DP run, "clip" for clipping alone, "-" without either."""
    pv = summary.get("privacy")
    if not pv:
        return "-"
    if "epsilon" not in pv:
        return "clip"
    return f"{pv['epsilon']:.2f} (d={pv['delta']:.0e})"


def print_table(summaries: Sequence[dict[str, Any]], title: str = "flexlora compare") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("run", "aggregation", "ranks", "rounds", "tokens", "train loss", "Rouge-L base", "Rouge-L final", "eval loss", "epsilon", "train s"):
        table.add_column(col, justify="right" if col not in ("run", "aggregation", "ranks") else "left")
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for s in summaries:
        table.add_row(
            s["name"], s["aggregation"], s["distribution"], str(s["rounds"]), str(s["tokens"]), fmt(s["final_train_loss"], 3),
            fmt(s["base_rouge_l_weighted"]), fmt(s["rouge_l_weighted"]), fmt(s["proxy_eval_loss"], 3), _epsilon(s), fmt(s["train_seconds"], 0),
        )
    import sys

    Console(width=None if sys.stdout.isatty() else 160).print(table)  # logs and CI: do not squeeze to 80 columns
