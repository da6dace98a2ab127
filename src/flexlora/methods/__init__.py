"""Aggregation methods: one file per method, one interface (:class:`AggregationMethod`)."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Mapping

import torch

from flexlora.methods.base import AggregationMethod
from flexlora.methods.fedavg import FedAvg
from flexlora.methods.fedex import FedExLoRA
from flexlora.methods.ffa import FFALoRA
from flexlora.methods.flexlora import FlexLoRA
from flexlora.methods.flora import FLoRA
from flexlora.methods.florist import FLoRIST
from flexlora.methods.hetlora import HetLoRA
from flexlora.methods.lora_fair import LoRAFAIR
from flexlora.methods.rank_partition import RankPartition
from flexlora.methods.rolora import RoLoRA

METHODS: dict[str, type[AggregationMethod]] = {
    cls.name: cls for cls in (FlexLoRA, FedAvg, HetLoRA, FLoRA, FFALoRA, RankPartition, FLoRIST, FedExLoRA, LoRAFAIR, RoLoRA)
}


def get_method(name: str, **options: Any) -> AggregationMethod:
    """Build a method by name; unknown names and options, values of the wrong type and values out of
    range fail with one message naming the option, its type and the method's options."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose one of {sorted(METHODS)}") from None
    typed = parse_method_options(name, options)
    try:
        return cls(**typed)
    except (TypeError, ValueError) as e:  # the constructor's range checks name the option
        raise ValueError(f"bad option for method {name!r}: {e}; its options are: {', '.join(method_options(cls)) or '(none)'}") from None


def parse_method_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option converted to the type its constructor declares (``--option threshold=0.5`` arrives
    as a number, ``--option threshold=abc`` as a string): numbers from numeric strings, literals only
    from their listed values, ``None`` only where the type allows it. A wrong value raises one
    ``ValueError`` naming the method, the option and the type it needs; ranges are the constructor's."""
    cls = METHODS[name]
    valid = method_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {', '.join(valid) or '(none)'}")
    hints = option_types(cls)
    out = {}
    for key, value in options.items():
        kind = hints.get(key)
        try:
            out[key] = value if kind is None else _coerce(value, kind)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"method {name!r}: option {key} must be {_describe(kind)}, got {value!r}") from None
    return out


def option_types(cls: type) -> dict[str, Any]:
    """The declared type of each constructor option (what :func:`parse_method_options` converts to)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a subclass that passes **options on keeps its parents' types
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                hints.update({k: v for k, v in typing.get_type_hints(init).items() if k != "return"})
            except (NameError, TypeError):
                continue
    return hints


def _coerce(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        if isinstance(value, bool) or value not in args:
            raise ValueError
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise ValueError
        if torch.device in args:  # a device name must name a device
            return torch.device(value)
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm)
            except (TypeError, ValueError, RuntimeError):
                continue
        raise ValueError
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        return int(value)  # an int, or a string of one
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)  # an int, a float, or a string of one
        if not math.isfinite(number):
            raise ValueError
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if kind is torch.dtype:
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            value = getattr(torch, value)
        if not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise ValueError
        return value
    if kind is torch.device:
        return torch.device(value)
    return value


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        if torch.device in args:
            return _describe(torch.device)
        return " or ".join(_describe(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a finite number (float)", str: "a string", type(None): "none",
            torch.dtype: "a float dtype (float32, float64, bfloat16, float16)", torch.device: "a device (cpu, cuda, cuda:0 ...)"}.get(kind, getattr(kind, "__name__", str(kind)))


def method_options(cls: type) -> list[str]:
    """The keyword options a method's constructor takes (what --option and federation.method_options accept)."""
    import inspect

    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return sorted(p.name for p in params if p.kind is not p.VAR_KEYWORD)  # passes more on: its own names are the known ones
    return sorted(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


__all__ = ["AggregationMethod", "METHODS", "get_method", "FlexLoRA", "FedAvg", "HetLoRA", "FLoRA", "FFALoRA", "RankPartition", "FLoRIST", "FedExLoRA", "LoRAFAIR", "RoLoRA"]
