"""Aggregate PEFT adapter directories trained anywhere (the ``flexlora aggregate`` command).

All outputs are written into a temporary sibling folder that is renamed to ``out`` only when
everything succeeded, so a failure leaves nothing partial behind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from flexlora.diagnostics import aggregation_report, summarise
from flexlora.fsutil import atomic_directory, check_output_folder, mark_output
from flexlora.methods import get_method
from flexlora.peft_io import AdapterError, read_adapter, write_adapter
from flexlora.update import LoraFactors, ModuleSpec, UpdateError, normalise_weights
from flexlora.validate import validate_update


def aggregate_adapter_dirs(
    inputs: Sequence[str | os.PathLike],
    method_name: str,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    method_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read adapters, aggregate, write each input's share under ``out/<input name>/``,
    the global update under ``out/global/`` and ``out/report.json``. Returns the report."""
    t0 = time.perf_counter()
    out = Path(out)
    if not inputs:
        raise UpdateError("no adapter directories given")
    paths = [Path(p) for p in inputs]
    check_output_folder(out, paths, overwrite=overwrite)
    options = dict(method_options or {})
    method = get_method(method_name, **options)
    if weights is not None and not method.uses_weights:
        raise UpdateError(f"{method_name} with these options ignores --weights ({method.paper}); drop --weights, or choose weighting=data or norm_x_data")
    names = output_names(paths)
    if "global" in names or "report.json" in names:
        raise UpdateError("an input folder may not be named 'global' or 'report.json' (reserved output names)")

    adapters = [read_adapter(p) for p in paths]
    t_read = time.perf_counter()
    base_models = {a.base_model for a in adapters if a.base_model}
    if len(base_models) > 1:
        by = {a.base_model: a.path for a in adapters if a.base_model}
        first, second = list(by.items())[:2]
        raise AdapterError(
            f"{second[1] / 'adapter_config.json'}: base model {second[0]!r} differs from {first[0]!r} of {first[1]}"
        )
    p = [1.0] * len(adapters) if weights is None else list(weights)
    p = normalise_weights(p, [a.to_update() for a in adapters])
    updates = [a.to_update(client_id=name, num_examples=1) for a, name in zip(adapters, names)]
    reference = {n: (f.d_out, f.d_in) for n, f in updates[0].modules.items()}
    for a, u in zip(adapters, updates):
        problems = validate_update(u, reference)
        if problems:
            raise AdapterError(f"{a.path / 'adapter_model.safetensors'}: {problems[0]}")

    method.check_specs([a.specs for a in adapters])
    state = method.aggregate(updates, weights=p)
    t_agg = time.perf_counter()

    with atomic_directory(out) as tmp:  # replaces ``out`` (a flexlora output, checked above) only when complete
        mark_output(tmp, "aggregate")
        for a, name in zip(adapters, names):
            share = method.share_for(state, a.specs)
            write_adapter(tmp / name, share, a.specs, template=a.config, dtype=a.dtype)
        g_factors = {}  # the exact global update: the adapter plus what the method merges into the base weights
        for n, gm in state.adapter.items():
            parts = [x for x in (gm, (state.base_delta or {}).get(n)) if x is not None and x.rank > 0]
            if parts:
                g_factors[n] = LoraFactors(A=torch.cat([x.A for x in parts], 0), B=torch.cat([x.B for x in parts], 1), scale=1.0)
        g_specs = {n: ModuleSpec(rank=f.rank, alpha=float(f.rank)) for n, f in g_factors.items()}
        if g_factors:
            write_adapter(tmp / "global", g_factors, g_specs, template=adapters[0].config, dtype=adapters[0].dtype, use_rslora=False)
        t_write = time.perf_counter()
        share_ranks = {n: sorted({a.specs[n].rank for a in adapters}) for n in adapters[0].specs}
        diag = aggregation_report(state, updates, p, share_ranks)
        report = {
            "method": method.name,
            "paper": method.paper,
            "options": {k: str(v) for k, v in options.items()},
            "inputs": [str(x) for x in paths],
            "weights": dict(zip(names, p)),
            "base_model": base_models.pop() if base_models else None,
            "merge_into_base": bool(state.info.get("merge_into_base", False)),
            "global_adapter": "global/" if g_factors else None,
            "summary": summarise(diag),
            "modules": diag,
            "svd_paths": state.info.get("svd_paths"),
            "timings_s": {
                "read": t_read - t0,
                "aggregate": t_agg - t_read,
                "write": t_write - t_agg,
                "diagnostics": time.perf_counter() - t_write,
            },
            "torch": torch.__version__,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    return report


def output_names(paths: Sequence[Path]) -> list[str]:
    """Each input's output folder name: its own name, prefixed by as many parent folders as it takes to
    tell inputs apart (two trainers' ``checkpoint-10`` become ``runA-checkpoint-10`` and ``runB-checkpoint-10``)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["-".join(x[-depth:]).lstrip("/-") or "root" for x in parts]
        if len(set(names)) == len(names):
            return names
    raise UpdateError("the same adapter folder is given twice")
