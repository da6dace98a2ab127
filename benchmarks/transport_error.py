"""What half-precision transport costs, measured on a run's own updates (used by flower_strategy.py;
kept out of the Strategy, which only aggregates what arrives).

:class:`TransportProbe` is a :class:`~flexlora.flower.strategy.FlexLoRAStrategy` that, after each
round, round-trips the accepted replies' factors through each dtype of ``probe`` (the real
encoding, :func:`flexlora.flower.payloads.tensors_to_arrays`) and records, under the round's
``"transport_error"``: the relative distance of the aggregate of the round-tripped updates from the
exact weighted sum of the originals (up), and the largest relative error of a share after the round
trip (down).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from flexlora.diagnostics import aggregation_report, summarise
from flexlora.flower.payloads import arrays_to_tensors, tensors_to_arrays
from flexlora.flower.peft_messages import parse_reply
from flexlora.flower.strategy import FlexLoRAStrategy, build_method
from flexlora.lowrank import factored_distance, factored_fro_norm
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec


class TransportProbe(FlexLoRAStrategy):
    """FlexLoRAStrategy that also measures, on every round's accepted updates, the error each
    transport dtype in ``probe`` would add."""

    def __init__(self, *args: Any, probe: Iterable[str] = ("bfloat16",), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe = tuple(probe)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        rec = self.history[-1]
        good = {str(m.metadata.src_node_id): m for m in replies if not m.has_error()}
        parsed = [parse_reply(good[node], self.declared) for node in rec["accepted"]]
        if parsed and "kept_previous_state" not in rec:
            updates, specs = [p.update for p in parsed], [p.spec for p in parsed]
            rec["transport_error"] = {dt: transport_error(self, updates, specs, dt, server_round) for dt in self.probe}
        return out


def transport_error(strategy: FlexLoRAStrategy, updates: list[ClientUpdate], specs: list[Mapping[str, ModuleSpec]], transport: str, server_round: int = 0) -> dict[str, float]:
    """The error sending these updates (and the shares back) in ``transport`` adds; a fresh method
    instance, so the strategy's state is not touched."""
    method = build_method(strategy.config)
    q_updates = [ClientUpdate(u.client_id, u.num_examples, {n: round_trip(f, transport) for n, f in u.modules.items()}) for u in updates]
    state = method.aggregate(q_updates, round=server_round)
    weights = [state.weights[u.client_id] for u in updates]
    up = summarise(aggregation_report(state, updates, weights, exact=False))
    exact_state = method.aggregate(updates, round=server_round)
    down = 0.0
    for spec in specs:
        for f in method.share_for(exact_state, spec).values():
            q = round_trip(f, transport)
            norm = factored_fro_norm(f.B.double(), f.A.double())
            if norm > 0:
                down = max(down, factored_distance(q.B.double(), q.A.double(), f.B.double(), f.A.double()) / norm)
    return {"aggregate_rel_error_vs_exact": up["rel_error_vs_exact"], "aggregate_max_rel_error_vs_exact": up["max_rel_error_vs_exact"], "share_max_rel_error": down}


def round_trip(f: LoraFactors, transport: str) -> LoraFactors:
    """The factors as the receiver sees them after the real encoding in ``transport``."""
    back = arrays_to_tensors(tensors_to_arrays({"A": f.A, "B": f.B}, transport), transport)
    return LoraFactors(A=back["A"].float(), B=back["B"].float(), scale=f.scale)
