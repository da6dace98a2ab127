"""Helpers shared by the benchmarks: environment/machine info, peak-memory reading, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Current resident set size in MiB (from /proc/self/statm; NaN where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def environment() -> dict[str, Any]:
    """Versions, machine and invocation, for the top of every results file."""
    import torch

    try:
        from importlib.metadata import version

        flexlora_version = version("flexlora")
    except Exception:  # pragma: no cover - not installed
        flexlora_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *(_relative(a) for a in sys.argv)]),  # no machine paths in committed results
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "flexlora": flexlora_version,
            "blas_mkl_available": bool(torch.backends.mkl.is_available()),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "nproc": os.cpu_count(),
            "cpus_usable": affinity,
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "mem_total_gib": _mem_total_gib(),
            "loadavg_at_start": load,
        },
    }


def _relative(arg: str) -> str:
    """A path argument relative to the repository (or to ../shared) when it lies there."""
    root = RESULTS_DIR.parents[1]
    for base, prefix in ((root, ""), (root.parent / "shared", "../shared/")):
        try:
            return prefix + str(Path(arg).resolve().relative_to(base.resolve()))
        except (ValueError, OSError):
            continue
    return arg


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default) + "\n")
    os.replace(tmp, path)
    return path


def save_and_show(path: Path, result: dict[str, Any], headline: tuple[str, ...]) -> Path:
    """Save ``result`` (:func:`write_json`) and print its ``headline`` keys and where it went."""
    path = write_json(Path(path), result)
    print(json.dumps({k: result[k] for k in headline}, indent=2))
    print(f"-> {path}")
    return path


def remove_work_folder(work: Path, keep: bool) -> None:
    """A benchmark's temporary working folder: removed, or kept and named (``--keep``)."""
    if keep:
        print(f"working folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, torch.dtype):
            return str(o)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def loopback_module():
    """scripts/flower_loopback.py as a module (the loopback SuperLink / SuperNode helpers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flower_loopback", RESULTS_DIR.parents[1] / "scripts" / "flower_loopback.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
