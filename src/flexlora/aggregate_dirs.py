"""Aggregate PEFT adapter directories trained anywhere (the ``flexlora aggregate`` command).

All outputs are written into a temporary sibling folder that is renamed to ``out`` only when
everything succeeded, so a failure leaves nothing partial behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from flexlora.diagnostics import aggregation_report, summarise
from flexlora.fsutil import atomic_directory, check_output_folder, mark_output
from flexlora.methods import get_method
from flexlora.rounds import close_step
from flexlora.peft_io import Adapter, AdapterError, read_adapter, write_adapter
from flexlora.update import LoraFactors, ModuleSpec, UpdateError, normalise_weights
from flexlora.validate import validate_update


def aggregate_adapter_dirs(
    inputs: Sequence[str | os.PathLike],
    method_name: str,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    method_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    allow_different_base: bool = False,
) -> dict[str, Any]:
    """Read adapters, aggregate, write each input's share under ``out/<input name>/``,
    the global update under ``out/global/`` and ``out/report.json``. Returns the report.

    Every input must adapt the same layers at the same shapes (the same base model, whatever the
    adapters call it); base-model names that still differ once spelling is set aside are refused
    unless ``allow_different_base``."""
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
    check_same_model(adapters)
    base_models = check_same_base_name(adapters, allow_different_base)
    p = [1.0] * len(adapters) if weights is None else list(weights)
    p = normalise_weights(p, [a.to_update() for a in adapters])
    updates = [a.to_update(client_id=name, num_examples=1) for a, name in zip(adapters, names)]
    reference = {n: (f.d_out, f.d_in) for n, f in updates[0].modules.items()}
    for a, u in zip(adapters, updates):
        problems = validate_update(u, reference)
        if problems:
            raise AdapterError(f"{a.path / 'adapter_model.safetensors'}: {problems[0]}")

    method.check_specs([a.specs for a in adapters], labels=[str(a.path) for a in adapters])
    notes = rank_notes(adapters)
    for line in notes:  # said before the work, like a run's capping note
        print(f"{method.name}: {line}", file=sys.stderr)
    share_ranks = {n: sorted({a.specs[n].rank for a in adapters}) for n in adapters[0].specs}
    # the server's close step (flexlora.rounds.close_step): every input passed the screen above, all of them are needed
    closing = close_step(([u.client_id for u in updates], {}), len(updates), lambda: method.aggregate(updates, weights=p), lambda n: "", method.name,
                         lambda state: aggregation_report(state, updates, p, share_ranks))
    if closing.state is None:
        raise UpdateError(closing.skipped)
    state, diag = closing.state, closing.report
    t_agg = time.perf_counter()
    # what is written: at least float32 whatever the inputs (a bf16 input must not round the aggregate)
    out_dtype = torch.promote_types(torch.float32, method.dtype)

    with atomic_directory(out) as tmp:  # replaces ``out`` (a flexlora output, checked above) only when complete
        mark_output(tmp, "aggregate")
        for a, name in zip(adapters, names):
            share = method.share_for(state, a.specs)
            write_adapter(tmp / name, share, a.specs, template=a.config, dtype=out_dtype)
        merged = {n: gm for n, gm in (state.base_delta or {}).items() if gm.rank > 0}
        g_factors = {}  # the exact global update: the adapter plus what the method merges into the base weights
        for n, gm in state.adapter.items():
            parts = [x for x in (gm, merged.get(n)) if x is not None and x.rank > 0]
            if parts:
                g_factors[n] = LoraFactors(A=torch.cat([x.A for x in parts], 0), B=torch.cat([x.B for x in parts], 1), scale=1.0)
        if g_factors:
            write_full_rank(tmp / "global", g_factors, adapters[0].config, out_dtype)
        base_update = bool(merged) and any(gm.rank > 0 for gm in state.adapter.values())  # not all of global/: say which part
        if base_update:
            write_full_rank(tmp / "base_update", {n: LoraFactors(A=gm.A, B=gm.B, scale=1.0) for n, gm in merged.items()}, adapters[0].config, out_dtype)
        t_write = time.perf_counter()
        report = {
            "method": method.name,
            "paper": method.paper,
            "options": {k: str(v) for k, v in options.items()},
            "inputs": [str(x) for x in paths],
            "weights": dict(zip(names, p)),
            "base_model": base_models[0] if len(base_models) == 1 else (base_models or None),
            "merge_into_base": bool(state.info.get("merge_into_base", False)),
            "global_adapter": "global/" if g_factors else None,
            "base_update": "base_update/" if base_update else None,
            "shares": method.shares_text,
            "rank_notes": notes,
            "dtype": str(out_dtype).removeprefix("torch."),
            "summary": summarise(diag),
            "modules": diag,
            "svd_paths": state.info.get("svd_paths"),
            "timings_s": {
                "read": t_read - t0,
                "aggregate": t_agg - t_read - closing.seconds["diagnostics"],
                "write": t_write - t_agg,
                "diagnostics": closing.seconds["diagnostics"],
            },
            "torch": torch.__version__,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    return report


def write_full_rank(folder: Path, factors: dict[str, LoraFactors], template: dict[str, Any], dtype: torch.dtype) -> None:
    """An update held as factors, as a PEFT adapter at its own rank with scale 1 (alpha = r): ``B @ A`` exactly."""
    specs = {n: ModuleSpec(rank=f.rank, alpha=float(f.rank)) for n, f in factors.items()}
    write_adapter(folder, factors, specs, template=template, dtype=dtype, use_rslora=False)


def rank_notes(adapters: Sequence[Adapter]) -> list[str]:
    """A rank above its layer's width, min(d_out, d_in), is accepted (PEFT trains it) and said: the layer's
    update has at most that rank, so the extra ranks add nothing; each input's share keeps the input's rank."""
    notes = []
    for a in adapters:
        over = [(n, s.rank, min(a.modules[n].d_out, a.modules[n].d_in)) for n, s in a.specs.items() if n in a.modules and s.rank > min(a.modules[n].d_out, a.modules[n].d_in)]
        if over:
            n, r, w = over[0]
            more = f" (and {len(over) - 1} more layers)" if len(over) > 1 else ""
            notes.append(
                f"{a.path}: rank {r} exceeds the width {w} of layer {n}{more}: its update has rank at most {w}, so the ranks "
                f"above add nothing; its share keeps rank {r}"
            )
    return notes


def output_names(paths: Sequence[Path]) -> list[str]:
    """Each input's output folder name: its own name, prefixed by as many parent folders as it takes to
    tell inputs apart (two trainers' ``checkpoint-10`` become ``runA-checkpoint-10`` and ``runB-checkpoint-10``)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["-".join(x[-depth:]).lstrip("/-") or "root" for x in parts]
        if len(set(names)) == len(names):
            return names
    raise UpdateError("the same adapter folder is given twice")


def check_same_model(adapters: Sequence[Adapter]) -> None:
    """Adapters of one base model adapt the same layers at the same shapes: what their layer names
    and shapes say decides, whether or not the adapters name their base model."""
    ref = adapters[0]
    ref_shapes = {n: (f.d_out, f.d_in) for n, f in ref.modules.items()}
    for a in adapters[1:]:
        shapes = {n: (f.d_out, f.d_in) for n, f in a.modules.items()}
        if set(shapes) != set(ref_shapes):
            only_a, only_ref = sorted(set(shapes) - set(ref_shapes)), sorted(set(ref_shapes) - set(shapes))
            raise AdapterError(
                f"{a.path} and {ref.path} adapt different layers ({len(only_a)} only in {a.path}, e.g. {only_a[:2]}; "
                f"{len(only_ref)} only in {ref.path}, e.g. {only_ref[:2]}): they were made for different models or with different target_modules"
            )
        for n, shape in shapes.items():
            if shape != ref_shapes[n]:
                raise AdapterError(
                    f"{a.path} and {ref.path} were made for different models: layer {n} is {shape[0]}x{shape[1]} in {a.path} "
                    f"but {ref_shapes[n][0]}x{ref_shapes[n][1]} in {ref.path}"
                )


def base_model_key(name: str) -> str:
    """A base-model name with its spelling set aside: a local path resolved (trailing slashes, ``./``,
    relative vs absolute), a hub id as it is."""
    stripped = name.rstrip("/\\") or name
    path = Path(stripped).expanduser()
    if path.exists():
        return str(path.resolve())
    return os.path.normpath(stripped)


def _same_base(a: str, b: str) -> bool:
    """Equal once spelled alike, or one a relative path that the other (absolute) path ends with
    (the adapters were made from different working directories)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    for rel, absolute in ((pa, pb), (pb, pa)):
        if rel.parts and not rel.is_absolute() and absolute.is_absolute() and ".." not in rel.parts and absolute.parts[-len(rel.parts) :] == rel.parts:
            return True
    return False


def check_same_base_name(adapters: Sequence[Adapter], allow_different_base: bool) -> list[str]:
    """The distinct base-model names the adapters give (spelling set aside); different names are
    refused unless ``allow_different_base`` (the user knows, e.g., that a renamed copy is the same model)."""
    named = [(a, base_model_key(a.base_model)) for a in adapters if a.base_model]
    distinct: list[tuple[Adapter, str]] = []
    for a, key in named:
        if not any(_same_base(key, k) for _, k in distinct):
            distinct.append((a, key))
    if len(distinct) > 1 and not allow_different_base:
        (first, _), (second, _) = distinct[:2]
        raise AdapterError(
            f"{second.path / 'adapter_config.json'}: base model {second.base_model!r} differs from {first.base_model!r} of {first.path}; "
            "if they are the same model, pass --allow-different-base"
        )
    return [a.base_model for a, _ in distinct]
