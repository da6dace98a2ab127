"""The ``flexlora`` command: run | compare | aggregate | eval.

Errors in what the user gave (bad config, bad adapter, bad data) print one line naming the
problem and exit with code 2; nothing already saved is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from flexlora.data.types import DataError
from flexlora.update import UpdateError

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


USER_ERRORS: tuple[type[BaseException], ...] = (UpdateError, DataError, ConfigError, FileNotFoundError)


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


def cmd_aggregate(args: argparse.Namespace) -> int:
    from flexlora.aggregate_dirs import aggregate_adapter_dirs

    options = _parse_options(args.option)
    if "dtype" in options:
        import torch

        options["dtype"] = getattr(torch, str(options["dtype"]))
    report = aggregate_adapter_dirs(
        args.adapters, args.method, args.out, weights=_parse_weights(args.weights), method_options=options, overwrite=args.overwrite
    )
    summary = report["summary"]
    print(
        f"{report['method']}: aggregated {len(report['inputs'])} adapters into {args.out} "
        f"(mean effective rank {summary.get('effective_rank', 0):.1f}, "
        f"mean rel. error vs exact average {summary.get('rel_error_vs_exact', 0):.2e}, "
        f"aggregation {report['timings_s']['aggregate']:.2f}s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from flexlora.methods import METHODS

    agg = sub.add_parser("aggregate", help="aggregate PEFT adapters trained anywhere; write each input's share")
    agg.add_argument("adapters", nargs="+", help="PEFT adapter directories (adapter_config.json + adapter_model.safetensors)")
    agg.add_argument("--method", required=True, choices=sorted(METHODS))
    agg.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    agg.add_argument("--weights", help="comma-separated weights, one per adapter (e.g. training-set sizes); default: equal")
    agg.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. singular_values=sqrt")
    agg.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    agg.set_defaults(func=cmd_aggregate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"flexlora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as e:  # method options and similar
        print(f"flexlora {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
