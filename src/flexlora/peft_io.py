"""PEFT adapter directories <-> plain LoRA factors.

A PEFT LoRA adapter is ``adapter_config.json`` (r, lora_alpha, rank_pattern, alpha_pattern,
use_rslora, target_modules, base_model_name_or_path, ...) and ``adapter_model.safetensors`` with
keys like ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. Ranks may differ per
module (``rank_pattern``); they are read from the tensor shapes and checked against the config.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexlora.fsutil import atomic_directory
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, UpdateError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora=true) carry a magnitude vector that LoRA aggregation does not define",
}


# PEFT initialisations that leave the base weights as they are (B A = 0 at the start); the others
# (pissa, olora, corda, loftq, lora_ga, ...) subtract their initial factors from the base weights.
PLAIN_INITS = ("gaussian", "eva", "orthogonal")


class AdapterError(UpdateError):
    """An adapter directory is missing, malformed, or inconsistent; the message names file and module."""


@dataclass
class Adapter:
    """A LoRA adapter as plain data."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraFactors]
    specs: dict[str, ModuleSpec]
    dtype: torch.dtype

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def to_update(self, client_id: str | None = None, num_examples: int = 1) -> ClientUpdate:
        return ClientUpdate(client_id=client_id or self.path.name, num_examples=num_examples, modules=dict(self.modules))


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter directory; every problem raises AdapterError naming the file."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter directory")
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing (a PEFT adapter needs {CONFIG_NAME})")
    if not w_path.is_file():
        hint = " (adapter_model.bin found: re-save it with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{w_path}: missing{hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, only LORA adapters can be aggregated")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{cfg_path}: {why}")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in PLAIN_INITS):
        raise AdapterError(
            f"{cfg_path}: init_lora_weights = {init!r} changed the base model's weights when the adapter was made, so its factors are "
            "no plain LoRA update of the original base; save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            "(which makes it plain LoRA, init_lora_weights = true) and aggregate that"
        )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{w_path}: unreadable safetensors file ({e})") from None
    modules, specs = factors_from_state_dict(tensors, config, where=str(w_path), config_where=str(cfg_path))
    dtypes = {t.dtype for f in modules.values() for t in (f.A, f.B)}
    dtype = torch.float32 if len(dtypes) != 1 else dtypes.pop()
    return Adapter(path=path, config=config, modules=modules, specs=specs, dtype=dtype)


def _lora_settings(config: Mapping[str, Any], where: str) -> tuple[int, float, dict[str, Any], dict[str, Any], bool]:
    """(r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) of an adapter config, PEFT's defaults filled in."""
    try:
        return (
            int(config.get("r", 8)),
            float(config.get("lora_alpha", 8)),
            dict(config.get("rank_pattern") or {}),
            dict(config.get("alpha_pattern") or {}),
            bool(config.get("use_rslora", False)),
        )
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{where}: bad r / lora_alpha / rank_pattern / alpha_pattern ({e})") from None


def module_of_key(key: str) -> tuple[str, str] | None:
    """(module name, "A" or "B") of a PEFT LoRA state-dict key, or None for any other tensor."""
    m = _KEY.match(key)
    return (m["module"], m["which"]) if m else None


def peft_key(module: str, which: str) -> str:
    """The key ``get_peft_model_state_dict`` gives a module's lora_A / lora_B weight."""
    return f"base_model.model.{module}.lora_{which}.weight"


def spec_from_config(config: Mapping[str, Any], modules: Iterable[str], where: str = "adapter config") -> dict[str, ModuleSpec]:
    """Per-module rank and alpha that a LoRA config (r, lora_alpha, rank_pattern, alpha_pattern,
    use_rslora) gives each of ``modules`` (PEFT's pattern rule)."""
    r_default, alpha_default, rank_pattern, alpha_pattern, rslora = _lora_settings(config, where)
    out = {}
    for name in modules:
        try:
            out[name] = ModuleSpec(
                rank=int(_pattern_value(rank_pattern, name, r_default)), alpha=float(_pattern_value(alpha_pattern, name, alpha_default)), rslora=rslora
            )
        except (TypeError, ValueError, re.error) as e:
            raise AdapterError(f"{where}, module {name}: bad rank / alpha ({e})") from None
    return out


def factors_from_state_dict(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str = "state dict", config_where: str | None = None, infer_ranks: bool = False
) -> tuple[dict[str, LoraFactors], dict[str, ModuleSpec]]:
    """LoRA factors and specs from a PEFT LoRA state dict (``get_peft_model_state_dict``) and its
    LoRA config. ``infer_ranks``: ranks come from the tensor shapes (alpha and rsLoRA still from
    ``config``); otherwise a rank the config declares must match the weights. Every problem raises
    AdapterError naming ``where`` and the module."""
    config_where = config_where or where
    r_default, alpha_default, rank_pattern, alpha_pattern, rslora = _lora_settings(config, config_where)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: tensor {key!r} is not a LoRA A/B weight (modules_to_save, biases and embeddings are not aggregated)")
        factors.setdefault(m["module"], {})[m["which"]] = t
    if not factors:
        raise AdapterError(f"{where}: contains no LoRA weights")
    modules: dict[str, LoraFactors] = {}
    specs: dict[str, ModuleSpec] = {}
    for name in sorted(factors):
        pair = factors[name]
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where}, module {name}: has lora_{''.join(pair)} but not both lora_A and lora_B")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{where}, module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form a LoRA pair")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterError(f"{where}, module {name}: integer weights ({A.dtype}, {B.dtype}); quantised adapters are not supported")
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise AdapterError(f"{where}, module {name}: contains NaN or Inf")
        rank = int(A.shape[0])
        if rank < 1:
            raise AdapterError(f"{where}, module {name}: rank 0")
        try:
            declared = int(_pattern_value(rank_pattern, name, r_default))
            alpha = float(_pattern_value(alpha_pattern, name, alpha_default))
        except (TypeError, ValueError, re.error) as e:
            raise AdapterError(f"{config_where}, module {name}: bad rank_pattern / alpha_pattern entry ({e})") from None
        if declared != rank and not infer_ranks:
            raise AdapterError(f"{config_where}, module {name}: config declares rank {declared} but the weights have rank {rank}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise AdapterError(f"{config_where}, module {name}: lora_alpha must be positive, got {alpha}")
        spec = ModuleSpec(rank=rank, alpha=alpha, rslora=rslora)
        modules[name] = LoraFactors(A=A, B=B, scale=spec.scale)
        specs[name] = spec
    return modules, specs


def state_dict_from_factors(modules: Mapping[str, LoraFactors], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The PEFT LoRA state dict of ``modules`` (what ``set_peft_model_state_dict`` loads)."""
    out = {}
    for name, f in modules.items():
        out[peft_key(name, "A")] = f.A.to(dtype or f.A.dtype).contiguous()
        out[peft_key(name, "B")] = f.B.to(dtype or f.B.dtype).contiguous()
    return out


def adapter_config(specs: Mapping[str, ModuleSpec], template: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """An adapter_config.json for per-module ranks: the most common rank/alpha as defaults,
    ``rank_pattern`` / ``alpha_pattern`` for the others. Other fields come from ``template``."""
    if not specs:
        raise AdapterError("cannot write an adapter with no modules")
    rslora = {s.rslora for s in specs.values()}
    if len(rslora) != 1:
        raise AdapterError("cannot write one adapter that mixes rsLoRA and plain LoRA scaling")
    r_default = Counter(s.rank for s in specs.values()).most_common(1)[0][0]
    a_default = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "target_modules": sorted(specs),
        "base_model_name_or_path": None,
    }
    if template:
        config.update({k: v for k, v in template.items() if k not in ("rank_pattern", "alpha_pattern")})
    config.update(overrides)
    config.update(
        r=int(r_default),
        lora_alpha=a_default,
        use_rslora=rslora.pop(),
        rank_pattern={n: s.rank for n, s in sorted(specs.items()) if s.rank != r_default},
        alpha_pattern={n: s.alpha for n, s in sorted(specs.items()) if s.alpha != a_default},
    )
    return config


def write_adapter(
    path: str | os.PathLike,
    modules: Mapping[str, LoraFactors],
    specs: Mapping[str, ModuleSpec],
    template: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> Path:
    """Write a PEFT adapter directory atomically (a temp dir renamed into place)."""
    path = Path(path)
    for name, f in modules.items():
        s = specs[name]
        if f.rank != s.rank or not math.isclose(f.scale, s.scale, rel_tol=1e-9):
            raise AdapterError(f"module {name}: factors have rank {f.rank}, scale {f.scale} but the spec says rank {s.rank}, scale {s.scale}")
    config = adapter_config({n: specs[n] for n in modules}, template, **overrides)
    tensors = state_dict_from_factors(modules, dtype)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return path
