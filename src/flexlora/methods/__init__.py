"""Aggregation methods: one file per method, one interface (:class:`AggregationMethod`)."""

from __future__ import annotations

from typing import Any

from flexlora.methods.base import AggregationMethod
from flexlora.methods.fedavg import FedAvg
from flexlora.methods.fedex import FedExLoRA
from flexlora.methods.ffa import FFALoRA
from flexlora.methods.flexlora import FlexLoRA
from flexlora.methods.flora import FLoRA
from flexlora.methods.florist import FLoRIST
from flexlora.methods.hetlora import HetLoRA
from flexlora.methods.rank_partition import RankPartition

METHODS: dict[str, type[AggregationMethod]] = {
    cls.name: cls for cls in (FlexLoRA, FedAvg, HetLoRA, FLoRA, FFALoRA, RankPartition, FLoRIST, FedExLoRA)
}


def get_method(name: str, **options: Any) -> AggregationMethod:
    """Build a method by name; unknown names and options fail with the list of what exists."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; choose one of {sorted(METHODS)}") from None
    valid = method_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {', '.join(valid) or '(none)'}")
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad options for method {name!r}: {e}; its options are: {', '.join(valid) or '(none)'}") from None


def method_options(cls: type) -> list[str]:
    """The keyword options a method's constructor takes (what --option and federation.method_options accept)."""
    import inspect

    params = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return sorted(p.name for p in params if p.kind is not p.VAR_KEYWORD)  # passes more on: its own names are the known ones
    return sorted(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


__all__ = ["AggregationMethod", "METHODS", "get_method", "FlexLoRA", "FedAvg", "HetLoRA", "FLoRA", "FFALoRA", "RankPartition", "FLoRIST", "FedExLoRA"]
