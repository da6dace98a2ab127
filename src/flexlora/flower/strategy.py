"""A Flower message-API ``Strategy`` for heterogeneous-rank LoRA: FlexLoRA (or any flexlora method)
in anybody's Flower app.

Flower's FedAvg sums the replies' arrays in place, so clients at different LoRA ranks break it.
:class:`FlexLoRAStrategy` takes what a FlowerTune client already sends (its PEFT LoRA state dict,
``get_peft_model_state_dict``, in ``"arrays"`` and its example count in ``"metrics"``), at whatever
rank each client trains, and hands every node the share of the global update at that node's own
ranks. The aggregation is the core method's (:mod:`flexlora.methods`); this module turns messages
into :class:`~flexlora.update.ClientUpdate` objects and back and screens them with
:mod:`flexlora.validate`. One concern per module: the message format in
:mod:`flexlora.flower.peft_messages`, each node's ranks in :mod:`flexlora.flower.ranks`, the byte
counts in :mod:`flexlora.flower.accounting`, the client side's few lines in :mod:`flexlora.flower.client`.

The server side needs torch, numpy, safetensors and flwr only (no transformers, PEFT or rouge-score).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flexlora.diagnostics import summarise
from flexlora.fold import RoundFold
from flexlora.flower.accounting import Traffic
from flexlora.flower.payloads import LOG, QUERY, arrays_to_tensors, tensors_to_arrays, transport_dtype
from flexlora.flower.peft_messages import (
    ARRAYS,
    CONFIG,
    LORA_CONFIG,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAINED_FACTORS,
    TRANSPORT,
    ParsedReply,
    lora_settings,
    parse_reply,
    spec_to_lora_settings,
)
from flexlora.flower.ranks import NodeRanks, first_line
from flexlora.methods import AggregationMethod, get_method
from flexlora.peft_io import AdapterError, factors_from_state_dict, spec_from_config, state_dict_from_factors, write_adapter
from flexlora.rounds import close_step, rank_summary
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, ServerState, UpdateError
from flexlora.validate import ValidationConfig

CLIENT_FIX = (
    "answer the strategy's query and load shares with flexlora.flower.client "
    "(@app.query() returning answer_query(msg, lora_config); load_share(model, msg) instead of set_peft_model_state_dict)"
)


@dataclass(frozen=True)
class StrategyConfig:
    """How the strategy samples, validates, encodes and saves; checked once (:meth:`check`)."""

    method: str = "flexlora"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1
    fraction_evaluate: float = 0.0  # federated evaluation on the nodes is off unless asked for
    min_evaluate_nodes: int = 0
    min_good_replies: int = 1  # a round with fewer valid updates keeps the previous global state
    transport: str = "float32"  # dtype of the factors on the wire: float32, float16, bfloat16
    max_rank: int | None = None  # a reply above this rank is dropped
    norm_factor: float | None = 100.0  # a reply whose update norm exceeds this x the round median is dropped
    save_every: int = 0  # write the global update as a PEFT adapter every k rounds (0: never)
    save_dir: str | None = None
    base_model_name_or_path: str | None = None  # recorded in the saved adapters
    ask_new_nodes: bool = True  # send a node never heard from a "query" for its LoRA config
    query_timeout: float = 60.0

    def check(self) -> None:
        transport_dtype(self.transport)
        if not (0.0 <= self.fraction_train <= 1.0 and 0.0 <= self.fraction_evaluate <= 1.0):
            raise ValueError("fraction_train and fraction_evaluate must be in [0, 1]")
        if min(self.min_train_nodes, self.min_available_nodes, self.min_evaluate_nodes, self.save_every) < 0 or self.min_good_replies < 1:
            raise ValueError("min_train_nodes, min_available_nodes, min_evaluate_nodes and save_every must be >= 0, min_good_replies >= 1")
        if self.save_every and not self.save_dir:
            raise ValueError("save_every needs a save_dir")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.query_timeout <= 0:
            raise ValueError("query_timeout must be > 0")


def reply_order(msg: Message) -> tuple[int, bytes, int]:
    """The order replies are folded in: by a digest of what they carry, error replies last.

    A float sum depends on its order, and Flower draws new node ids at every start, so folding in
    node-id order would give other bits (at float32 rounding) each time the same federation runs.
    The digest covers every array, metric and config entry of the reply; identical replies tie,
    and their order cannot change the sum."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return (1, b"", node)
    h = hashlib.sha256()
    for name, record in sorted(msg.content.array_records.items()):
        h.update(name.encode())
        for key, array in record.items():
            h.update(f"{key}:{array.dtype}:{tuple(array.shape)}".encode())
            h.update(array.data)
    for name, record in [*sorted(msg.content.metric_records.items()), *sorted(msg.content.config_records.items())]:
        h.update(f"{name}:{sorted(record.items())!r}".encode())
    return (0, h.digest(), node)


class FlexLoRAStrategy(Strategy):
    """Any flexlora aggregation method as a Flower strategy; every node trains at its own LoRA ranks.

    ``lora_config`` is the LoRA config the app declares (a ``peft.LoraConfig`` or a dict): it gives
    alpha and rsLoRA to replies that do not describe themselves, and ranks to nodes whose ranks the
    strategy does not know yet. Use it like FedAvg::

        strategy = FlexLoRAStrategy("flexlora", lora_config=peft_config)
        result = strategy.start(grid, ArrayRecord(get_peft_model_state_dict(model)), num_rounds=3,
                                evaluate_fn=my_evaluate_fn)

    Which global is which:

    * every ``ArrayRecord`` Flower's loop hands your code (``evaluate_fn``'s arrays, ``Result.arrays``)
      is the global **at the declared ranks**, the share a node at those ranks gets, so it loads into
      the model you declared (``set_peft_model_state_dict``) exactly as FedAvg's does;
    * the exact global at its full rank (the sum of the clients' ranks, alpha = r per module):
      :meth:`global_arrays` (a PEFT state dict), :meth:`save_adapter` (an adapter folder that
      ``PeftModel.from_pretrained`` loads), :meth:`adapter_evaluate_fn` (hands ``fn`` that folder).

    After each round :attr:`history` holds the round's record (per node: bytes, ranks, status;
    dropped replies and why; aggregation diagnostics); :attr:`state` is the method's global state.
    """

    def __init__(self, method: str = "flexlora", lora_config: Any = None, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(StrategyConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown FlexLoRAStrategy setting {unknown[0]!r} (known: {', '.join(sorted(StrategyConfig.__dataclass_fields__))})")
        self.config = StrategyConfig(method=method, **settings)
        self.config.check()
        self.method = build_method(self.config)
        self.declared = lora_settings(lora_config if lora_config is not None else {})
        self.state: ServerState | None = None
        self.shapes: dict[str, tuple[int, int]] = {}
        self.ranks: NodeRanks | None = None  # each node's ranks; set up with the first arrays
        self.traffic = Traffic(self.config.transport)
        self._open: dict[str, Any] | None = None  # the record of the round in progress

    @property
    def history(self) -> list[dict[str, Any]]:
        """The closed rounds' records."""
        return self.traffic.rounds

    def summary(self) -> None:
        c = self.config
        LOG.info("\t├──> Method: %s %s", c.method, dict(c.method_options) or "")
        LOG.info("\t├──> Sampling: train %.2f (min %d) | evaluate %.2f (min %d) | min available %d", c.fraction_train, c.min_train_nodes, c.fraction_evaluate, c.min_evaluate_nodes, c.min_available_nodes)
        LOG.info("\t├──> Declared LoRA: %s", self.declared or "(none: replies describe themselves)")
        LOG.info("\t└──> Transport: %s | min good replies %d | save every %d round(s)", c.transport, c.min_good_replies, c.save_every)

    # -- train --------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per sampled node, each with the share at that node's own ranks."""
        self._ensure_state(arrays)
        rec = self._begin(server_round)
        if self.config.fraction_train == 0.0:
            return []
        nodes = _sample(grid, self.config.fraction_train, self.config.min_train_nodes, self.config.min_available_nodes)
        if self.config.ask_new_nodes:
            self._ask(grid, self.ranks.to_ask(nodes), rec)
        return [self._share_message(n, server_round, config, MessageType.TRAIN, rec) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parse and screen the replies, aggregate the good ones with the core method; too few good
        replies (or an aggregate the method refuses) keep the previous global state. Each reply is
        folded into the method's running sums as it is parsed (:mod:`flexlora.fold`), in the order of
        :func:`reply_order`: the strategy keeps about one dense update, not every node's factors, and a
        round's bits depend neither on the order Flower delivers the replies in nor on the node ids
        Flower draws at each start."""
        rec = self._begin(server_round)
        parsed: dict[str, ParsedReply] = {}
        dropped: dict[str, list[str]] = {}
        replied: set[str] = set()
        replies = sorted(replies, key=reply_order)
        fold = RoundFold(self.method, self.shapes, ValidationConfig(norm_factor=self.config.norm_factor, max_rank=self.config.max_rank),
                         [str(m.metadata.src_node_id) for m in replies])
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            replied.add(str(node))
            entry = self.traffic.message(rec, node, "up", msg)
            if msg.has_error():
                dropped[str(node)] = [self._node_error(server_round, node, str(msg.error.reason or msg.error.code), rec)]
                fold.absent(str(node))
                continue
            try:
                p = parse_reply(msg, self.declared)
            except (AdapterError, UpdateError, KeyError, ValueError, TypeError) as e:
                dropped[str(node)] = [f"malformed reply: {e}"]
                fold.absent(str(node))
                continue
            self.traffic.payload(entry, "up", p.payload_bytes)
            entry["ranks_up"] = rank_summary(p.spec)
            fold.add(p.update, reload=lambda msg=msg: parse_reply(msg, self.declared).update)  # a held update is parsed again from Flower's reply
            parsed[str(node)] = ParsedReply(ClientUpdate(p.update.client_id, p.update.num_examples, {}), p.spec, p.metrics, p.payload_bytes)
        for node, e in rec["nodes"].items():
            if "ranks_down" in e and node not in replied:
                dropped[node] = ["no reply within the round's timeout"]
        closing = close_step(fold.settle(), self.config.min_good_replies, lambda: fold.aggregate(server_round),
                             lambda n: f"only {n} valid update(s), fewer than min_good_replies={self.config.min_good_replies}", self.config.method, fold.report)
        accepted_ids, new_state, why = closing.accepted, closing.state, closing.skipped
        dropped.update(closing.rejected)
        for node, reasons in dropped.items():
            rec["nodes"].setdefault(node, {})["status"] = "dropped"
            LOG.warning("flexlora strategy: round %d: reply from node %s dropped: %s", server_round, node, "; ".join(reasons))
        rec["dropped"] = dropped
        rec["accepted"] = list(accepted_ids)
        metrics = _weighted_metrics([parsed[cid] for cid in accepted_ids])
        if new_state is None:
            for cid in accepted_ids:
                rec["nodes"][cid]["status"] = "valid, not aggregated"
            rec["kept_previous_state"] = why
            LOG.warning("flexlora strategy: round %d: %s; the global state of round %d is kept", server_round, why, self.state.round if self.state else 0)
            self._close(rec)
            return None, MetricRecord(metrics) if metrics else None
        for cid in accepted_ids:
            self.ranks.from_reply(int(cid), parsed[cid].spec)  # served at the ranks it trains at
            rec["nodes"][cid]["status"] = "ok"
        rec["aggregation"] = summarise(closing.report)
        self.state = new_state
        if self.config.save_every and server_round % self.config.save_every == 0:
            rec["saved"] = str(self.save_adapter(Path(str(self.config.save_dir)) / f"round-{server_round}"))
        self._close(rec)
        return self.declared_arrays(), MetricRecord({**metrics, "accepted-replies": len(accepted_ids)})

    # -- evaluate -----------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.config.fraction_evaluate == 0.0:
            return []
        self._ensure_state(arrays)
        rec = self._last_record(server_round)
        nodes = _sample(grid, self.config.fraction_evaluate, self.config.min_evaluate_nodes, self.config.min_available_nodes)
        return [self._share_message(n, server_round, config, MessageType.EVALUATE, rec) for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The nodes' metrics averaged with their ``num-examples`` as weights; bad replies are skipped."""
        rows = []
        rec = self._last_record(server_round)
        for msg in replies:
            self.traffic.message(rec, int(msg.metadata.src_node_id), "up", msg)
            if msg.has_error() or METRICS not in msg.content:
                continue
            m = dict(msg.content[METRICS])
            n = m.get(NUM_EXAMPLES)
            if isinstance(n, (int, float)) and n > 0:
                rows.append(ParsedReply(ClientUpdate(str(msg.metadata.src_node_id), int(n), {}), {}, m))
        metrics = _weighted_metrics(rows)
        return MetricRecord(metrics) if metrics else None

    # -- the global update, for your code -------------------------------------------------------------
    def global_factors(self) -> tuple[dict[str, LoraFactors], dict[str, ModuleSpec]]:
        """The exact global update at its full rank with scale 1 (alpha = r per module); a module
        without an update yet is the declared share (B = 0)."""
        if self.state is None:
            raise RuntimeError("the strategy has no global state yet (call start() or configure_train first)")
        factors, specs = {}, {}
        fresh = self.method.share_for(self.state, self.ranks.declared)
        for name, gm in self.state.adapter.items():
            if gm.rank > 0:
                factors[name] = LoraFactors(A=gm.A.float(), B=gm.B.float(), scale=1.0)
                specs[name] = ModuleSpec(rank=gm.rank, alpha=float(gm.rank))
            else:
                factors[name], specs[name] = fresh[name], self.ranks.declared[name]
        return factors, specs

    def global_arrays(self) -> ArrayRecord:
        """The exact global update at its full rank as a PEFT LoRA state dict (float32, alpha = r):
        it loads into a PEFT model built from :meth:`save_adapter`'s adapter_config, not the declared one."""
        factors, _ = self.global_factors()
        return tensors_to_arrays(state_dict_from_factors(factors), "float32")

    def declared_arrays(self) -> ArrayRecord:
        """The global update at the declared ranks (the share a declared-rank node gets) as a PEFT
        LoRA state dict (float32): what Flower's loop hands ``evaluate_fn`` and ``Result.arrays``."""
        if self.state is None:
            raise RuntimeError("the strategy has no global state yet (call start() or configure_train first)")
        return tensors_to_arrays(state_dict_from_factors(self.method.share_for(self.state, self.ranks.declared)), "float32")

    def save_adapter(self, folder: Path) -> Path:
        """Write the exact full-rank global update as a PEFT adapter folder (``PeftModel.from_pretrained``
        or ``AutoPeftModelForCausalLM`` load it, rank_pattern and all)."""
        factors, specs = self.global_factors()
        return write_adapter(folder, factors, specs, template={"base_model_name_or_path": self.config.base_model_name_or_path})

    def adapter_evaluate_fn(self, fn: Callable[[int, Path], MetricRecord | None], folder: str | Path | None = None) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """An ``evaluate_fn`` for :meth:`start` that hands ``fn`` the exact full-rank global update as
        a PEFT adapter folder (``folder/round-N``; a temporary folder when none is given)."""
        root = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="flexlora-global-"))

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            self._ensure_state(arrays)
            return fn(server_round, self.save_adapter(root / f"round-{server_round}"))

        return evaluate

    def write_report(self, path: str | Path) -> Path:
        """The rounds' records, the communication totals and each node's ranks as JSON (atomically)."""
        from flexlora.fsutil import atomic_write_text

        data = {"method": self.config.method, "transport": self.config.transport, "rounds": self.history, "communication": self.traffic.report(),
                "node_ranks": self.ranks.summary() if self.ranks else {}}
        atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True, default=str))
        return Path(path)

    # -- helpers ------------------------------------------------------------------------------------
    def _ensure_state(self, arrays: ArrayRecord) -> None:
        """The first arrays (``initial_arrays``: the app's PEFT LoRA state dict) name the modules
        and their shapes; a non-zero initial adapter becomes the starting global update."""
        if self.state is not None:
            return
        try:
            modules, specs = factors_from_state_dict(arrays_to_tensors(arrays), self.declared, where="initial_arrays", infer_ranks=True)
        except AdapterError as e:
            raise ValueError(f"initial_arrays must be a PEFT LoRA state dict (get_peft_model_state_dict): {e}") from None
        self.shapes = {n: (f.d_out, f.d_in) for n, f in modules.items()}
        self.ranks = NodeRanks(_declared_or(self.declared, specs), self.shapes, self.config.max_rank)
        if any(bool(f.B.any()) for f in modules.values()):
            start = ClientUpdate("initial", 1, {n: LoraFactors(f.A.float(), f.B.float(), f.scale) for n, f in modules.items()})
            self.state = self.method.aggregate([start], round=0)
        else:
            self.state = self.method.initial_state(self.shapes)

    def _share_message(self, node: int, server_round: int, config: ConfigRecord, message_type: str, rec: dict[str, Any]) -> Message:
        spec = self.ranks.of(node)
        tensors = state_dict_from_factors(self.method.share_for(self.state, spec))
        conf = ConfigRecord(dict(config))
        conf.update({SERVER_ROUND: server_round, TRAINED_FACTORS: ",".join(self.method.trained_factors(server_round)), LORA_CONFIG: json.dumps(spec_to_lora_settings(spec), sort_keys=True), TRANSPORT: self.config.transport})
        msg = Message(RecordDict({ARRAYS: tensors_to_arrays(tensors, self.config.transport), CONFIG: conf}), dst_node_id=node, message_type=message_type)
        entry = self.traffic.message(rec, node, "down", msg)
        entry["ranks_down"] = rank_summary(spec)
        self.traffic.payload(entry, "down", sum(t.numel() for t in tensors.values()) * transport_dtype(self.config.transport).itemsize)
        return msg

    def _ask(self, grid: Grid, nodes: list[int], rec: dict[str, Any]) -> None:
        """Ask nodes never heard from for their LoRA config; a node that cannot say gets the declared one."""
        if not nodes:
            return
        msgs = [Message(RecordDict({CONFIG: ConfigRecord({"want": LORA_CONFIG})}), dst_node_id=n, message_type=QUERY, ttl=self.config.query_timeout) for n in nodes]
        for m in msgs:
            self.traffic.message(rec, int(m.metadata.dst_node_id), "down", m)
        answers = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(msgs, timeout=self.config.query_timeout)}
        for n in nodes:
            if n in answers:
                self.traffic.message(rec, n, "up", answers[n])
            why = self.ranks.from_answer(n, answers.get(n))
            if why:
                LOG.info("flexlora strategy: node %s gets the declared LoRA ranks %s until it replies (%s)", n, rank_summary(self.ranks.declared), why)

    def _node_error(self, server_round: int, node: int, reason: str, rec: dict[str, Any]) -> str:
        """Why a node's error reply is dropped; a load error is recorded, and its cause and fix are
        logged once per node (a share that did not fit teaches the node's ranks: :class:`NodeRanks`)."""
        load = self.ranks.from_error(node, reason)
        if load is None:
            return f"node error: {first_line(reason)}"
        what, learned = load
        rec.setdefault("load_errors", {})[str(node)] = what
        if self.ranks.first_time_told(node):
            then = "it is served at its own ranks from the next round" if learned else "it will fail again at these ranks"
            LOG.warning("flexlora strategy: round %d: node %s cannot load its share: %s; %s. To serve every node at its own ranks from round 1, %s",
                        server_round, node, what, then, CLIENT_FIX)
        return f"load error: {what}"

    def _begin(self, server_round: int) -> dict[str, Any]:
        if self._open is None or self._open["round"] != server_round:
            self._open = {**self.traffic.open_round(server_round), "started": time.perf_counter()}
        return self._open

    def _last_record(self, server_round: int) -> dict[str, Any]:
        for r in reversed(self.history):
            if r["round"] == server_round:
                return r
        return self._begin(server_round)

    def _close(self, rec: dict[str, Any]) -> None:
        rec["seconds"] = round(time.perf_counter() - rec.pop("started"), 4)
        self.traffic.close_round(rec)
        self._open = None
        LOG.info("flexlora strategy: round %d: %d update(s) aggregated, %d dropped, %.1f KiB down / %.1f KiB up, %.1f MiB so far",
                 rec["round"], 0 if rec.get("kept_previous_state") else len(rec.get("accepted", [])), len(rec.get("dropped", {})), rec["bytes_down"] / 1024, rec["bytes_up"] / 1024, self.traffic.total_bytes / 2**20)


def build_method(config: StrategyConfig) -> AggregationMethod:
    """The configured method; refused when it merges into the base weights (a PEFT client does not)."""
    method = get_method(config.method, **dict(config.method_options))
    if method.merges_into_base:
        raise ValueError(
            f"method {config.method!r} merges its update into the clients' base weights, which a plain PEFT client does not do; "
            "use flexlora, fedavg, hetlora, ffa, rank_partition, lora_fair or rolora with this strategy"
        )
    return method


def _declared_or(declared: Mapping[str, Any], inferred: Mapping[str, ModuleSpec]) -> dict[str, ModuleSpec]:
    """The declared config's ranks where it names them (r or rank_pattern), else the initial arrays'."""
    spec = spec_from_config(declared, inferred, where="the declared lora_config")
    if "r" not in declared and not declared.get("rank_pattern"):
        spec = {n: ModuleSpec(inferred[n].rank, s.alpha, s.rslora) for n, s in spec.items()}
    return spec


def _sample(grid: Grid, fraction: float, min_nodes: int, min_available: int) -> list[int]:
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    size = max(int(len(list(grid.get_node_ids())) * fraction), min_nodes, 1)
    nodes, _ = sample_nodes(grid, min_available, size)
    return sorted(int(n) for n in nodes)


def _weighted_metrics(rows: list[ParsedReply]) -> dict[str, float]:
    """Every numeric metric averaged with the replies' example counts as weights (the count summed)."""
    total = sum(p.update.num_examples for p in rows)
    if not rows or total <= 0:
        return {}
    keys = sorted({k for p in rows for k in p.metrics if k != NUM_EXAMPLES})
    out: dict[str, float] = {NUM_EXAMPLES: float(total)}
    for k in keys:
        pairs = [(p.update.num_examples, p.metrics[k]) for p in rows if k in p.metrics and math.isfinite(p.metrics[k])]
        w = sum(n for n, _ in pairs)
        if w > 0:
            out[k] = sum(n * v for n, v in pairs) / w
    return out
