"""Mixed precision for the forward and backward passes: bfloat16 autocast where the processor has it.

``precision`` (``train.precision``, ``eval.precision``) is one of

* ``"float32"`` -- no autocast: every matmul in the model's own dtype (float32 on a CPU), exactly
  the code path and numbers of flexlora before autocast existed;
* ``"bf16-autocast"`` -- ``torch.autocast(device, dtype=torch.bfloat16)`` around the forward pass
  (the backward pass follows the forward's dtypes). Matmuls run in bfloat16 with float32
  accumulation; the parameters stay in their own dtype, so LoRA factors, their gradients, the
  optimizer state and the loss stay float32, and so does everything a client sends;
* ``"auto"`` -- ``"bf16-autocast"`` on a CPU that multiplies bfloat16 natively
  (:func:`cpu_has_native_bf16`), ``"float32"`` on any other CPU and on accelerators (whose dtype
  is chosen by ``model.dtype`` instead).

The detection is real, not assumed: :func:`cpu_has_native_bf16` reads the CPU's feature flags
through ``torch.cpu.get_capabilities()`` (the cpuinfo library that ships with torch, on every OS):
AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on ARM64. Without that function (older torch)
it reads the ``flags`` / ``Features`` line of Linux's ``/proc/cpuinfo``. ``torch.backends.mkldnn`` is
not used for this: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true on every AVX-512 CPU,
including those where oneDNN only emulates bfloat16 (no bfloat16 dot-product instructions).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Iterator, Literal

import torch

if TYPE_CHECKING:
    from flexlora.config import EvalConfig

__all__ = ["AUTO_BF16_PASSES", "PRECISIONS", "Precision", "autocast_for", "cpu_has_native_bf16", "explain_precision", "pass_precision", "resolve_precision"]

Precision = Literal["auto", "float32", "bf16-autocast"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bf16-autocast")

# Flag names that mean "bfloat16 dot products in hardware": torch.cpu.get_capabilities() keys and
# /proc/cpuinfo flags (x86 "flags", ARM64 "Features" where the extension is called "bf16").
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 / AMX-BF16, ARM64 BF16).

    Read from torch's CPU capability query (cpuinfo), else from ``/proc/cpuinfo``; False when
    neither can tell. Tests monkeypatch this function to stand for another machine."""
    query = getattr(torch.cpu, "get_capabilities", None)
    if query is not None:
        try:
            caps = query()
        except (RuntimeError, OSError):
            caps = None
        if caps is not None:
            return any(bool(caps.get(flag, False)) for flag in _NATIVE_BF16_FLAGS)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"float32"`` or ``"bf16-autocast"``: what ``precision`` means for a model on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16-autocast" if torch.device(device).type == "cpu" and cpu_has_native_bf16() else "float32"


def explain_precision(precision: str, device: torch.device | str) -> str:
    """What ``precision`` resolves to on ``device`` and why, for a run's opening lines."""
    resolved = resolve_precision(precision, device)
    if precision != "auto":
        return resolved
    if torch.device(device).type != "cpu":
        return f"{resolved} (auto: on {torch.device(device).type} model.dtype decides)"
    return f"{resolved} (auto: this CPU {'multiplies' if cpu_has_native_bf16() else 'does not multiply'} bfloat16 natively)"


EvalPass = Literal["generation", "scoring"]
# The passes where "auto" turns bf16 autocast on (on a CPU with native bfloat16): none, by measurement
# (SmolLM2, 2 cores; README "Mixed precision on the CPU"): generation gains 1.10x and changes 4 of 16
# greedy outputs (benchmarks/eval_throughput.py --precision); on the demo's final adapters bf16 raised the
# eval loss from 2.669 / 2.587 to 2.685 / 2.624: under autocast a merged update is rounded with its weight
# to bfloat16, and an attached adapter's output is added in bfloat16, so small updates are partly lost.
# "bf16-autocast" remains available.
AUTO_BF16_PASSES: frozenset[str] = frozenset()


def pass_precision(cfg: EvalConfig, device: torch.device | str, which: EvalPass) -> str:
    """The precision of one kind of evaluation pass: ``"generation"`` (greedy decoding) or
    ``"scoring"`` (the teacher-forced proxies' forward pass). An explicit ``cfg.precision`` holds for
    both; ``"auto"`` is bf16 autocast only for the passes in :data:`AUTO_BF16_PASSES`, where it was
    measured to pay on a CPU with native bfloat16, and float32 for the others."""
    if cfg.precision == "auto" and which not in AUTO_BF16_PASSES:
        return "float32"
    return resolve_precision(cfg.precision, device)


@contextlib.contextmanager
def autocast_for(precision: str, device: torch.device | str) -> Iterator[str]:
    """Wrap a forward pass: bfloat16 autocast when ``precision`` resolves to it on ``device``, nothing
    at all otherwise (the float32 path is the plain code). Yields the resolved precision."""
    resolved = resolve_precision(precision, device)
    if resolved == "float32":
        yield resolved
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        yield resolved
