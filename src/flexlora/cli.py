"""The ``flexlora`` command: run | compare | aggregate | eval | config | status.

Errors in what the user gave (bad config, bad adapter, bad data) print one line naming the
problem and exit with code 2; nothing already saved is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from flexlora.config import ConfigError
from flexlora.data.types import DataError
from flexlora.update import UpdateError

EXIT_BAD_INPUT = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from flexlora.checkpoint import CheckpointError

    return (UpdateError, DataError, ConfigError, FileNotFoundError, CheckpointError)


USER_ERRORS: tuple[type[BaseException], ...] = _user_errors()


def _parse_value(text: str) -> Any:
    """Command-line values: JSON when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"option {pair!r} must look like KEY=VALUE")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = _parse_value(value)
    return options


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` assignments, plus ``--device`` as ``model.device``."""
    out = list(args.set)
    if getattr(args, "device", None):
        out.append(f"model.device={json.dumps(args.device)}")
    return out


def cmd_aggregate(args: argparse.Namespace) -> int:
    from flexlora.aggregate_dirs import aggregate_adapter_dirs

    options = _parse_options(args.option)
    if "dtype" in options:
        from flexlora.models import SERVER_DTYPES, resolve_dtype

        if options["dtype"] not in SERVER_DTYPES:
            raise ConfigError(f"--option dtype={options['dtype']}: the server computes in one of {list(SERVER_DTYPES)}")
        options["dtype"] = resolve_dtype(str(options["dtype"]))
    report = aggregate_adapter_dirs(
        args.adapters, args.method, args.out, weights=_parse_weights(args.weights), method_options=options, overwrite=args.overwrite,
        allow_different_base=args.allow_different_base,
    )
    summary = report["summary"]
    print(
        f"{report['method']}: aggregated {len(report['inputs'])} adapters into {args.out} "
        f"(mean effective rank {summary.get('effective_rank', 0):.1f}, "
        f"mean rel. error vs exact average {summary.get('rel_error_vs_exact', 0):.2e}, "
        f"aggregation {report['timings_s']['aggregate']:.2f}s)"
    )
    print(f"{report['method']}: the per-input folders hold {report['shares']}")  # the method's own words
    if report["merge_into_base"]:
        from pathlib import Path

        merge = Path(args.out) / (report["base_update"] or "global")
        print(f"{report['method']}: merge {merge} into the base model with PeftModel.from_pretrained(base, that folder).merge_and_unload()")
    if isinstance(report.get("base_model"), list):
        print(f"{report['method']}: --allow-different-base: the inputs name different base models {report['base_model']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flexlora.fsutil import atomic_write_text

    from flexlora.config import load_config
    from flexlora.simulate import Simulation

    from flexlora.fsutil import atomic_directory, check_output_folder

    cfg = load_config(args.config, _overrides(args))
    if args.plan:
        return _print_plan(cfg)
    out = Path(args.out)
    if args.resume and not out.exists():
        raise ConfigError(f"--resume: {out} does not exist, so there is no run to continue (drop --resume to start one there)")
    inputs = [p for p in (cfg.data.path, cfg.data.heldout_file, cfg.model.source) if p and Path(p).exists()]
    check_output_folder(out, inputs, overwrite=args.overwrite, resume=args.resume)
    if args.overwrite and not args.resume and out.is_dir() and any(out.iterdir()):
        with atomic_directory(out) as staging:  # the old run stays whole until the new one is complete
            summary = Simulation(cfg, staging, progress=not args.quiet).run()
            summary["final_adapters"] = str(out / "final")
            atomic_write_text(staging / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    else:
        summary = Simulation(cfg, out, progress=not args.quiet).run(resume=args.resume)
    from flexlora.compare import print_table

    print_table([summary], title=f"flexlora run {cfg.name}")
    print(f"metrics: {Path(args.out) / 'metrics.jsonl'}  adapters: {summary['final_adapters']}{final_contents(Path(summary['final_adapters']))}")
    return 0


def final_contents(final) -> str:
    """What a run's final/ holds, in words: the names are the run's resource types that some client had."""
    if not final.is_dir():
        return ""
    shares = sorted(p.name for p in final.iterdir() if p.is_dir() and p.name != "global")
    text = " (global/: the exact global update"
    if shares:
        text += f"; {', '.join(s + '/' for s in shares)}: the share a client of that resource type receives"
    return text + ")"


def _print_plan(cfg) -> int:
    """Count the run's local-training tokens without loading the model (only its tokenizer)."""
    import functools

    from flexlora.models import load_tokenizer
    from flexlora.rounds import sample_clients
    from flexlora.seeds import derived_seed
    from flexlora.data.clients import load_clients
    from flexlora.train import tokenize_client, planned_tokens

    tokenizer = load_tokenizer(cfg.model)
    train = [c for c in load_clients(cfg) if not c.heldout and c.train]
    tokenize_client_cached = functools.lru_cache(maxsize=None)(lambda cid: tokenize_client(tokenizer, by_id[cid], cfg.train))
    by_id = {c.client_id: c for c in train}
    per_round = []
    for rnd in range(1, cfg.federation.rounds + 1):
        per_round.append(sum(planned_tokens(tokenizer, c, cfg.train, derived_seed(cfg.federation.seed, "train", rnd, c.client_id), tokenize_client_cached(c.client_id)) for c in sample_clients(train, cfg.federation, rnd, cfg.privacy)))
    print(f"{cfg.name}: {len(train)} training clients, {cfg.federation.rounds} rounds; local-training tokens per round "
          f"min {min(per_round):,} / mean {sum(per_round) // len(per_round):,} / max {max(per_round):,}; total {sum(per_round):,}")
    pv = cfg.privacy
    if pv.noisy:
        from flexlora.privacy import epsilon
        from flexlora.rounds import clients_per_round

        m = clients_per_round(cfg.federation, len(train))
        eps = epsilon(pv.noise_multiplier, cfg.federation.rounds, pv.delta, pv.sampling, len(train), m)
        print(f"privacy: epsilon {eps:.3g} at delta {pv.delta:g} after {cfg.federation.rounds} rounds ({pv.sampling} sampling of {m} of {len(train)} clients, "
              f"noise multiplier {pv.noise_multiplier:g}, clip norm {pv.clip_norm:g}: noise std {pv.noise_multiplier * pv.clip_norm / m:.3g} per entry)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flexlora.compare import expand_runs, print_table, run_compare
    from flexlora.config import load_config_dict

    base = load_config_dict(args.config, _overrides(args))
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    runs = expand_runs(base, methods)
    summaries = run_compare(runs, Path(args.out), progress=not args.quiet)
    print_table(summaries)
    print(f"table: {Path(args.out) / 'compare.json'}  plot: {Path(args.out) / 'compare.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flexlora.config import load_config
    from flexlora.evaluate import evaluate_clients
    from flexlora.fsutil import atomic_write_text
    from flexlora.models import load_model
    from flexlora.rounds import eval_subset
    from flexlora.data.clients import load_clients, why_nothing_to_evaluate

    overrides = _overrides(args)
    if args.data:
        overrides += [f'data.kind="{args.data_kind}"', f'data.path="{args.data}"']
    if args.model:
        overrides.append(f'model.source="{args.model}"')
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; eval writes one JSON file (e.g. {out / 'eval.json'})")
    all_clients = load_clients(cfg)
    split = cfg.eval.split
    clients = eval_subset(sorted((c for c in all_clients if (c.heldout or args.all_clients) and (c.eval if split == "eval" else c.test)), key=lambda c: c.client_id), cfg.eval.clients)
    if not clients:  # before the model is loaded
        why = "no client has examples in split " + repr(split) if args.all_clients else why_nothing_to_evaluate(cfg, all_clients)
        hint = "" if args.all_clients else "; --all-clients evaluates every client's eval split"
        raise ConfigError(f"nothing to evaluate: {why}{hint}")
    if args.adapter:
        from flexlora.peft_io import read_adapter

        read_adapter(args.adapter)  # a clear error for a broken adapter before the model is loaded
    model, tokenizer = load_model(cfg.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    result = evaluate_clients(model, tokenizer, clients, cfg.eval, progress=not args.quiet).to_dict()
    result["adapter"] = args.adapter
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True))
    from flexlora.stats import format_interval

    iv = result["intervals"]
    loss = "" if result["proxy_eval_loss"] is None else f", eval loss {format_interval(result['proxy_eval_loss'], iv.get('proxy_eval_loss'), 3)}"
    print(f"Rouge-L (weighted) {format_interval(result['rouge_l_weighted'], iv.get('rouge_l_weighted'))}, "
          f"mean {format_interval(result['rouge_l_mean'], iv.get('rouge_l_mean'))}{loss} over {len(clients)} clients -> {out}")
    print(f"[low, high]: {iv['interval']['level']:.0%} bootstrap interval, resampling the {iv['interval']['units']} {iv['interval']['unit']}s scored")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from flexlora.config_reference import defaults_toml, markdown_reference

    if args.markdown:
        sys.stdout.write(markdown_reference())
    elif args.defaults:
        sys.stdout.write(defaults_toml())
    else:
        from flexlora.config import load_config

        sys.stdout.write(defaults_toml(load_config(args.config, _overrides(args)).to_dict()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flexlora.flower.server import run_status

    code, line = run_status(args.run)
    print(line)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexlora", description=__doc__.splitlines()[0],
        epilog="Config keys: `flexlora config --defaults` (every key, default and meaning) or docs/config.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from flexlora.methods import METHODS

    agg = sub.add_parser("aggregate", help="aggregate PEFT adapters trained anywhere; write each input's share")
    agg.add_argument("adapters", nargs="+", help="PEFT adapter directories (adapter_config.json + adapter_model.safetensors)")
    agg.add_argument("--method", required=True, choices=sorted(METHODS))
    agg.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    agg.add_argument("--weights", help="comma-separated weights, one per adapter (e.g. training-set sizes); default: equal")
    agg.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. singular_values=sqrt")
    agg.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    agg.add_argument(
        "--allow-different-base", action="store_true",
        help="aggregate adapters whose base-model names differ (layers and shapes must still agree): for users who know they are the same model",
    )
    agg.set_defaults(func=cmd_aggregate)

    run = sub.add_parser("run", help="a federated fine-tuning run in one process")
    run.add_argument("--config", help="TOML config (defaults are used for anything it leaves out)")
    run.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints, final adapters")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. federation.rounds=5")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run folder flexlora wrote, once the new run is complete")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--plan", action="store_true", help="count the run's local-training tokens (tokenizer only, no model) and exit")
    run.add_argument("--device", help="where the model trains and evaluates: auto, cpu, cuda, cuda:N, mps (sets model.device)")
    run.set_defaults(func=cmd_run)

    cmp_ = sub.add_parser("compare", help="several methods on the same config and seed; one table and plot")
    cmp_.add_argument("--config", help="TOML config; [[compare]] tables list the runs")
    cmp_.add_argument("--out", required=True)
    cmp_.add_argument("--methods", help="comma-separated aggregation methods (instead of [[compare]] tables)")
    cmp_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cmp_.add_argument("--quiet", action="store_true")
    cmp_.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (sets model.device)")
    cmp_.set_defaults(func=cmd_compare)

    ev = sub.add_parser("eval", help="zero-shot Rouge-L of a base model or adapter on held-out clients")
    ev.add_argument("--adapter", help="PEFT adapter directory (omit to evaluate the base model)")
    ev.add_argument("--config", help="TOML config for model, data and eval settings")
    ev.add_argument("--data", help="data path (sets data.path)")
    ev.add_argument("--data-kind", default="ni", choices=["ni", "instruct", "suite"])
    ev.add_argument("--model", help="model source (sets model.source)")
    ev.add_argument("--all-clients", action="store_true", help="evaluate every client with eval data, not only held-out ones")
    ev.add_argument("--out", required=True, help="result JSON file")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (sets model.device)")
    ev.set_defaults(func=cmd_eval)

    conf = sub.add_parser(
        "config", help="every config key: defaults as a commented TOML, the reference page, or the configuration a run would use",
        description="Without --defaults or --markdown: the configuration --config and --set give (checked), every key commented.",
    )
    what = conf.add_mutually_exclusive_group()
    what.add_argument("--defaults", action="store_true", help="every key with its default, type and meaning, as a TOML that is itself a valid config")
    what.add_argument("--markdown", action="store_true", help="the reference page (docs/config.md): key, type, default, meaning")
    conf.add_argument("--config", help="TOML config to show with every key filled in")
    conf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. federation.rounds=5")
    conf.set_defaults(func=cmd_config)
    st = sub.add_parser("status", help="did a run complete? one line; exit 0 completed, 1 stopped or unfinished (check it after `flwr run`)")
    st.add_argument("run", help="run folder (the Flower App's `out`, or a `flexlora run --out` folder)")
    st.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"flexlora {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:  # method options and similar
        print(f"flexlora {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a path the user gave that cannot be read or written
        print(f"flexlora {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _one_line(e: BaseException) -> str:
    """An error's first line (some libraries' messages run over several)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
