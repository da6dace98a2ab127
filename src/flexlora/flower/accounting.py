"""Communication accounting as FlowerTune's tracker counts it: bytes per node and round, both
ways, and the running total (FlowerTune LLM examples hold a run to a 200 GB budget).

:class:`Traffic` writes its counts into the round records the strategy keeps (one dict per round
with a ``"nodes"`` dict), so a record shows a node's bytes next to its status and ranks.
"""

from __future__ import annotations

from typing import Any

from flexlora.flower.payloads import message_nbytes


class Traffic:
    """Bytes of Flower messages (as pushed to / pulled from the SuperLink) and of raw factors."""

    def __init__(self, transport: str = "float32") -> None:
        self.transport = transport
        self.total_bytes = 0
        self.rounds: list[dict[str, Any]] = []  # the closed rounds' records, in order

    def open_round(self, server_round: int) -> dict[str, Any]:
        """A new round record with its byte counters at zero."""
        return {"round": server_round, "nodes": {}, "bytes_down": 0, "bytes_up": 0, "cumulative_bytes": self.total_bytes}

    def message(self, rec: dict[str, Any], node: int | str, direction: str, message: Any) -> dict[str, Any]:
        """Count one message to (``"down"``) or from (``"up"``) ``node``; returns the node's entry."""
        return self.add(rec, node, direction, message_nbytes(message))

    def add(self, rec: dict[str, Any], node: int | str, direction: str, nbytes: int) -> dict[str, Any]:
        entry = rec["nodes"].setdefault(str(node), {})
        key = f"bytes_{direction}"
        entry[key] = entry.get(key, 0) + nbytes
        rec[key] += nbytes
        self.total_bytes += nbytes
        rec["cumulative_bytes"] = self.total_bytes
        return entry

    @staticmethod
    def payload(entry: dict[str, Any], direction: str, nbytes: int) -> None:
        """The raw factor bytes of a message (in its transport dtype), next to the message bytes."""
        key = f"payload_{direction}"
        entry[key] = entry.get(key, 0) + nbytes

    def close_round(self, rec: dict[str, Any]) -> None:
        self.rounds.append(rec)

    def report(self) -> dict[str, Any]:
        """Per round and node (bytes and payloads), and the running total."""
        return {
            "transport": self.transport,
            "total_bytes": self.total_bytes,
            "rounds": [
                {"round": r["round"], "bytes_down": r["bytes_down"], "bytes_up": r["bytes_up"], "cumulative_bytes": r["cumulative_bytes"],
                 "nodes": {n: {k: v for k, v in e.items() if k.startswith(("bytes", "payload"))} for n, e in r["nodes"].items()}}
                for r in self.rounds
            ],
        }
