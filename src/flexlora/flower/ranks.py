"""What LoRA ranks each node of a :class:`~flexlora.flower.strategy.FlexLoRAStrategy` trains at.

A node's ranks come from (first that applies): its answer to the strategy's one ``query``
(:func:`flexlora.flower.client.answer_query`), its last good reply, or the size-mismatch error it
replied with when a share did not fit its model; until then it gets the declared LoRA config's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flexlora.flower.peft_messages import CONFIG, LORA_CONFIG, is_load_error, lora_settings, ranks_from_load_error
from flexlora.peft_io import AdapterError, spec_from_config
from flexlora.rounds import rank_summary
from flexlora.update import ModuleSpec, UpdateError

Spec = dict[str, ModuleSpec]


class NodeRanks:
    """Per node, the spec (rank, alpha, rsLoRA per module) its share is cut at."""

    def __init__(self, declared: Spec, shapes: Mapping[str, tuple[int, int]], max_rank: int | None = None) -> None:
        self.declared = declared
        self.shapes = dict(shapes)
        self.max_rank = max_rank
        self.known: dict[int, Spec] = {}
        self.asked: set[int] = set()  # sent the query (once per node)
        self.told: set[int] = set()  # its load error was explained in the log (once per node)

    def of(self, node: int) -> Spec:
        return self.known.get(node, self.declared)

    def to_ask(self, nodes: Iterable[int]) -> list[int]:
        """The nodes never heard from nor asked; they count as asked from now on."""
        new = [n for n in nodes if n not in self.known and n not in self.asked]
        self.asked.update(new)
        return new

    def from_answer(self, node: int, answer: Any) -> str | None:
        """Learn from the node's answer to the query (a Message or None); the reason when it cannot."""
        if answer is None:
            return "no answer to the query"
        if answer.has_error():
            reason = str(answer.error.reason)
            return "its ClientApp has no query handler" if "No query function registered" in reason else f"its query handler failed ({first_line(reason)})"
        try:
            spec = spec_from_config(lora_settings(str(answer.content[CONFIG][LORA_CONFIG])), self.shapes, where=f"node {node}'s lora-config")
            self.check(spec)
        except (AdapterError, UpdateError, KeyError, ValueError, TypeError) as e:
            return f"its answer is unusable ({e})"
        self.known[node] = spec
        return None

    def from_reply(self, node: int, spec: Spec) -> None:
        """A good reply: the node is served at the ranks it trained at."""
        self.known[node] = spec

    def from_error(self, node: int, reason: str) -> tuple[str, bool] | None:
        """A node's error reply. None when it is not a load error; else (what happened, whether the
        node's ranks were learned from it). A share that did not fit the node's model names, in
        torch's size-mismatch message, the ranks the model has: the node is served at them next."""
        if not is_load_error(reason):
            return None
        sent = self.of(node)
        learned = {m: have for m, (_, have) in (ranks_from_load_error(reason) or {}).items() if m in sent}
        if learned:
            spec = {m: (ModuleSpec(learned[m], self.declared[m].alpha, self.declared[m].rslora) if m in learned else s) for m, s in sent.items()}
            try:
                self.check(spec)
            except UpdateError:
                learned = {}
            else:
                self.known[node] = spec
                return f"its model's LoRA ranks {rank_summary(spec)} differ from the share's {rank_summary(sent)}", True
        return f"it could not load the share at ranks {rank_summary(sent)} ({first_line(reason)})", False

    def first_time_told(self, node: int) -> bool:
        """True the first time it is asked for ``node`` (a cause is logged once per node)."""
        if node in self.told:
            return False
        self.told.add(node)
        return True

    def check(self, spec: Mapping[str, ModuleSpec]) -> None:
        for name, s in spec.items():
            limit = min(self.shapes[name])
            if s.rank > limit or (self.max_rank is not None and s.rank > self.max_rank):
                raise UpdateError(f"module {name}: rank {s.rank} exceeds {min(limit, self.max_rank or limit)}")

    def summary(self) -> dict[str, dict[str, int]]:
        return {str(n): rank_summary(s) for n, s in sorted(self.known.items())}


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text
