"""The server side (ServerApp): discover the nodes, then run the run's loop (:func:`flexlora.runner.run_rounds`)
with rounds planned and closed by the round engine and trained on the nodes."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from flexlora.algorithms import ALGORITHMS, get_algorithm
from flexlora.flower.node import NodeProfile
from flexlora.flower.payloads import (
    LOG,
    QUERY,
    RUN_CONFIG_DEFAULTS,
    SUMMARY,
    TRAIN,
    FlowerRunError,
    arrays_to_factors,
    config_to_json,
    factors_to_arrays,
    flwr_app,
    message_nbytes,
    spec_to_config,
)
from flexlora.rounds import ClientStatus
from flexlora.update import ClientUpdate, ServerState, UpdateError

# Flower's error codes (flwr.common.constant.ErrorCode) of the replies the SuperLink itself sends
NODE_UNAVAILABLE = 5  # the node missed its heartbeats (the reply's sender is the SuperLink, not the node)
EXPIRED = (3, 4)  # MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE: the message or its reply expired (TTL)

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import Context

    from flexlora.config import RunConfig
    from flexlora.rounds import RoundOutcome, RoundPlan


@dataclass
class FlowerSettings:
    """The Flower App's run config, typed."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)
    aggregation: str = ""
    out: str = "runs/flower"
    resume: bool = False
    round_timeout: float = 600.0
    min_clients: int = 0
    round_retries: int = 1
    min_nodes: int = 1
    node_wait_timeout: float = 120.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FlowerSettings":
        from flexlora.config import ConfigError

        unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown Flower run-config key {unknown[0]!r} (known: {', '.join(sorted(RUN_CONFIG_DEFAULTS))})")
        rc = {**RUN_CONFIG_DEFAULTS, **run_config}
        s = cls(
            config=str(rc["config"]),
            overrides=[o.strip() for o in str(rc["set"]).split(";") if o.strip()],
            aggregation=str(rc["aggregation"]),
            out=str(rc["out"]),
            resume=bool(rc["resume"]),
            round_timeout=float(rc["round-timeout"]),
            min_clients=int(rc["min-clients"]),
            round_retries=int(rc["round-retries"]),
            min_nodes=int(rc["min-nodes"]),
            node_wait_timeout=float(rc["node-wait-timeout"]),
        )
        if s.round_timeout <= 0 or s.node_wait_timeout <= 0 or s.round_retries < 0 or s.min_clients < 0 or s.min_nodes < 1:
            raise ConfigError("run config: round-timeout and node-wait-timeout must be > 0, round-retries and min-clients >= 0, min-nodes >= 1")
        return s

    def run_config(self) -> "RunConfig":
        from flexlora.config import load_config

        overrides = list(self.overrides)
        if self.aggregation:
            overrides.append(f'federation.aggregation="{self.aggregation}"')
        return load_config(self.config or None, overrides)


@dataclass
class _Attempt:
    plan: "RoundPlan"
    outcome: "RoundOutcome"
    replied: int
    nodes: dict[str, dict[str, Any]]


class FlowerServer:
    """The ServerApp's work: discover the nodes, then run the rounds, their local training on the
    nodes. Built from the round engine, the global model (evaluation, final adapters) and the run
    folder's writer, as the simulator is."""

    def __init__(self, grid, settings: FlowerSettings) -> None:
        from flexlora.config import ConfigError
        from flexlora.output import RunOutput
        from flexlora.runner import open_run

        self.grid = grid
        self.settings = settings
        cfg = settings.run_config()
        algorithm = get_algorithm(cfg.federation.algorithm)
        if not algorithm.on_flower:
            runs = " or ".join(n for n, a in ALGORITHMS.items() if a.on_flower)
            raise ConfigError(
                f"federation.algorithm = {algorithm.name!r} does not run on Flower yet: its sparse first stage trains full weight "
                f"updates that this app does not ship; use {runs} (any aggregation method works)"
            )
        self.cfg = cfg
        self.out = Path(settings.out).expanduser().resolve()
        self.server = open_run(cfg, progress=False)  # the model evaluates the global state; the federation becomes the nodes'
        self.engine = self.server.engine
        self.output = RunOutput(cfg, self.out)
        self.config_json = config_to_json(cfg)
        self.node_of: dict[int, int] = {}  # client id -> the node id that serves it now
        self.profiles: dict[int, NodeProfile] = {}  # client id -> profile
        self.queried: set[int] = set()  # node ids that answered the query (well or not)
        self.live: set[int] = set()  # node ids connected at the last look
        self.rejoins: dict[int, list[dict[str, Any]]] = {}  # client id -> the rounds it came back under a new node id
        self.poll_seconds = 1.0  # how often the replies are pulled while a round waits
        self.min_clients = settings.min_clients or max(1, cfg.federation.min_clients)
        if cfg.privacy.noisy and self.min_clients > 1:
            from flexlora.config import ConfigError

            raise ConfigError("min-clients must be 1 under DP (waiting for more replies would reveal how many clients came)")
        self.failed_round = 0

    # -- set-up ------------------------------------------------------------------------------------
    def discover(self) -> None:
        """Wait for ``min-nodes`` nodes, ask each for its profile, and make them the federation."""
        s = self.settings
        deadline = time.monotonic() + s.node_wait_timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < s.min_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        if len(nodes) < s.min_nodes:
            raise FlowerRunError(f"only {len(nodes)} node(s) connected within {s.node_wait_timeout:g}s, fewer than min-nodes={s.min_nodes}")
        LOG.info("flexlora: %d node(s) connected; asking for their ranks and data sizes", len(nodes))
        for n, p in self._query(nodes).items():
            if p.partition_id in self.node_of:
                raise FlowerRunError(f"nodes {self.node_of[p.partition_id]} and {n} both declare partition-id {p.partition_id}; give every node its own")
            self.node_of[p.partition_id] = n
            self.profiles[p.partition_id] = p
        if len(self.profiles) < s.min_nodes:
            raise FlowerRunError(f"only {len(self.profiles)} node(s) answered the query, fewer than min-nodes={s.min_nodes}")
        self.live = set(nodes)
        self.apply_profiles()
        for cid, p in sorted(self.profiles.items()):
            LOG.info("flexlora: node %s = client %d, type %s, %d examples", self.node_of[cid], cid, self.engine.fed.types[cid], p.num_examples)

    def _query(self, nodes: list[int]) -> dict[int, NodeProfile]:
        """Ask ``nodes`` who they are; returns the profiles of those that answered well. A node is
        asked once (a node that does not answer within ``node-wait-timeout`` is not waited for again)."""
        app = flwr_app()
        s = self.settings
        msgs = [
            app.Message(
                app.RecordDict({"config": app.ConfigRecord({"run-config": self.config_json})}),
                dst_node_id=n,
                message_type=QUERY,
                group_id="query",
                ttl=max(1.0, s.node_wait_timeout),
            )
            for n in nodes
        ]
        replies = self._exchange(msgs, s.node_wait_timeout)
        out: dict[int, NodeProfile] = {}
        for m in msgs:
            n, got = m.metadata.dst_node_id, replies.get(m.metadata.dst_node_id)
            r = got[0] if got else None
            self.queried.add(n)
            if r is None:
                LOG.warning("flexlora: node %s did not answer the query within %gs; it is not part of this run", n, s.node_wait_timeout)
                continue
            if r.has_error():
                LOG.warning("flexlora: node %s answered the query with an error (%s); it is not part of this run", n, r.error.reason)
                continue
            try:
                out[n] = NodeProfile.from_config(r.content["profile"])
            except (KeyError, ValueError, TypeError) as e:
                LOG.warning("flexlora: node %s sent a malformed profile (%s); it is not part of this run", n, e)
        return out

    def refresh_nodes(self, rnd: int) -> None:
        """The nodes connected now (Flower's node ids change when a SuperNode restarts): a node that
        declares a client of the run under a new id serves that client from now on, with the
        client's state (its ranks, pruned ranks, frozen factors) kept by the server."""
        live = set(self.grid.get_node_ids())
        new = sorted(live - self.queried)
        for n, p in (self._query(new) if new else {}).items():
            cid = p.partition_id
            if cid not in self.profiles:
                LOG.warning(
                    "flexlora: node %s declares client %d, which is not part of this run (the federation is fixed when the run starts); it is not served",
                    n, cid,
                )
                continue
            if p != self.profiles[cid]:
                LOG.warning(
                    "flexlora: node %s declares client %d with another profile (%s, was %s); it is not served (restart it with the same --node-config)",
                    n, cid, p.to_config(), self.profiles[cid].to_config(),
                )
                continue
            old = self.node_of.get(cid)
            self.node_of[cid] = n
            self.rejoins.setdefault(cid, []).append({"round": rnd, "node_id": n, "previous_node_id": old})
            LOG.info("flexlora: client %d rejoined as node %s (was node %s); it is served from round %d on", cid, n, old, rnd)
        self.live = live

    def _exchange(self, messages: list[Any], timeout: float) -> dict[int, tuple[Any, float]]:
        """Push ``messages`` and pull their replies until all came or ``timeout`` passed. Replies
        are paired with messages by the message they answer (an error the SuperLink sends for an
        unavailable node carries the SuperLink's id as its sender, not the node's). Returns, per
        destination node, the reply and the seconds after which it arrived ((None, 0.0): the
        SuperLink did not accept the message)."""
        t0 = time.monotonic()
        ids = list(self.grid.push_messages(messages))
        by_id = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        # a message the SuperLink did not accept (its node left the federation since the last look): no reply, at once
        got: dict[int, tuple[Any, float]] = {m.metadata.dst_node_id: (None, 0.0) for mid, m in zip(ids, messages) if not mid}
        pending = set(by_id)
        deadline = t0 + timeout
        while pending:
            for r in self.grid.pull_messages([mid for mid in ids if mid in pending]):
                mid = r.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    got[by_id[mid]] = (r, time.monotonic() - t0)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))
        return got

    def apply_profiles(self) -> None:
        """Make the federation the nodes': their ids, ranks and data sizes."""
        from flexlora.config import ConfigError
        from flexlora.data.types import ClientData
        from flexlora.rounds import Federation, client_specs, resource_types

        fed = self.engine.fed
        types_def = resource_types(self.cfg)
        train, types, ranks = [], {}, {}
        for cid, p in sorted(self.profiles.items()):
            if p.group_ranks:
                t, group_ranks = "custom-" + "-".join(f"{g}{r}" for g, r in sorted(p.group_ranks.items())), p.group_ranks
            elif p.rank_type:
                if p.rank_type not in types_def:
                    raise ConfigError(f"node {self.node_of[cid]} (client {cid}) declares rank-type {p.rank_type!r}, not one of {sorted(types_def)}")
                t, group_ranks = p.rank_type, types_def[p.rank_type]
            elif cid in fed.types:  # Flower's simulation: the type follows from the partition id
                t = fed.types[cid]
                group_ranks = types_def[t]
            else:
                raise ConfigError(f"node {self.node_of[cid]} (client {cid}) declares no rank-type and its partition id is not a training client of the config")
            ranks[cid], types[cid] = group_ranks, t
            train.append(ClientData(client_id=cid, category="flower-node", train=[], eval=[], num_train_full=p.num_examples, flags=[f"node:{self.node_of[cid]}"]))
        specs, notes = client_specs(self.cfg, ranks, fed.shapes, lambda cid: f"node {self.node_of[cid]} (client {cid})")
        self.engine.set_federation(Federation(train, fed.eval_clients, fed.shapes, types, specs, sorted({*fed.notes, *notes})))

    # -- one round ---------------------------------------------------------------------------------
    def round(self, rnd: int, state: ServerState, bar=None) -> tuple[dict[str, Any], ServerState]:
        """One round: train on the nodes (retrying a round without enough replies), then the
        engine's server half."""
        s = self.settings
        failed: list[dict[str, Any]] = []
        for attempt in range(1, s.round_retries + 2):
            a = self._attempt(rnd, state)
            if a.replied >= self.min_clients or not a.plan.clients:  # Poisson sampling (DP) may pick nobody
                break
            lost = {cid: reasons[0] for cid, reasons in a.outcome.dropped.items()}
            LOG.warning("flexlora: round %d attempt %d: %d node(s) replied, fewer than min-clients=%d (%s)", rnd, attempt, a.replied, self.min_clients, lost)
            failed.append({"attempt": attempt, "replied": a.replied, "dropped": a.outcome.dropped})
        else:
            self.failed_round = rnd
            raise FlowerRunError(
                f"round {rnd}: only {a.replied} of {len(a.plan.clients)} selected node(s) replied in {s.round_retries + 1} attempt(s), "
                f"fewer than min-clients={self.min_clients}; the run stops and keeps the state of round {rnd - 1}"
            )
        record, new_state = self.engine.close(a.plan, state, a.outcome)
        rec = record.to_dict()
        for cid, reasons in rec["dropped"].items():  # also the updates validation rejected
            LOG.warning("flexlora: round %d: client %s (node %s) left out: %s", rnd, cid, a.nodes.get(cid, {}).get("node_id"), "; ".join(reasons))
        rec["flower"] = {"attempts": attempt, "failed_attempts": failed, "nodes": a.nodes, "round_seconds": a.outcome.train_seconds}
        ok = sum(1 for e in rec["clients"] if e.get("status") == ClientStatus.OK)
        LOG.info("flexlora: round %d done: %d update(s) aggregated, %d client(s) left out%s", rnd, ok, len(rec["dropped"]), " (round skipped)" if "skipped" in rec else "")
        return rec, new_state

    def _attempt(self, rnd: int, state: ServerState) -> _Attempt:
        """Plan the round with the engine, send every node its own message, collect the replies."""
        from flexlora.rounds import RoundOutcome, factor_bytes, metrics_entry

        app = flwr_app()
        engine, s = self.engine, self.settings
        self.refresh_nodes(rnd)
        plan = engine.plan(rnd, state, budgets={cid: p.budget_mib for cid, p in self.profiles.items()})
        base = app.ArrayRecord({n: app.Array(d.contiguous().numpy()) for n, d in sorted(plan.base.items())}) if plan.base else None
        messages, gone = [], set()
        for planned in plan.clients:
            node = self.node_of[planned.client.client_id]
            if node not in self.live:  # gone, and not back under a new id: nothing to wait for
                gone.add(planned.cid)
                continue
            content = {
                "config": app.ConfigRecord(
                    {"run-config": self.config_json, "round": rnd, "client-id": planned.client.client_id, "seed": engine.train_seed(rnd, planned.client.client_id)}
                ),
                "spec": spec_to_config(planned.spec),
                "share": factors_to_arrays(planned.share),
            }
            if base is not None:
                content["base"] = base
            messages.append(app.Message(app.RecordDict(content), dst_node_id=node, message_type=TRAIN, group_id=str(rnd), ttl=s.round_timeout))
        sent = {m.metadata.dst_node_id: message_nbytes(m) for m in messages}
        replies = self._exchange(messages, s.round_timeout) if messages else {}

        outcome = RoundOutcome(updates=[], entries=[], dropped={}, bytes_up=0, train_seconds=time.perf_counter() - plan.started)
        nodes: dict[str, dict[str, Any]] = {}
        replied = 0
        for planned in plan.clients:
            cid, entry = planned.cid, planned.entry
            node = self.node_of[planned.client.client_id]
            reply, seconds = replies.get(node, (None, None)) if cid not in gone else (None, None)
            nodes[cid] = {"node_id": node, "bytes_received": sent.get(node, 0), "bytes_sent": message_nbytes(reply) if reply is not None else 0}
            if seconds is not None:
                nodes[cid]["reply_seconds"] = round(seconds, 3)
            if cid in gone:
                outcome.dropped[cid] = [f"node unavailable: node {node} is not connected (not sent; a restarted node is served again once it is back)"]
                entry["status"] = ClientStatus.UNAVAILABLE
            elif reply is None and seconds is not None:
                outcome.dropped[cid] = [f"node unavailable: the SuperLink did not accept the message for node {node} (it left the federation)"]
                entry["status"] = ClientStatus.UNAVAILABLE
            elif reply is None:
                outcome.dropped[cid] = [f"missed the round timeout ({s.round_timeout:g}s)"]
                entry["status"] = ClientStatus.TIMEOUT
            elif reply.has_error():
                code, reason = reply.error.code, str(reply.error.reason).strip()
                if code == NODE_UNAVAILABLE:
                    outcome.dropped[cid] = [f"node unavailable after {seconds:.1f}s: {reason}"]
                    entry["status"] = ClientStatus.UNAVAILABLE
                elif code in EXPIRED:
                    outcome.dropped[cid] = [f"missed the round timeout ({s.round_timeout:g}s): {reason}"]
                    entry["status"] = ClientStatus.TIMEOUT
                else:
                    outcome.dropped[cid] = [f"node error (Flower error code {code}) after {seconds:.1f}s: {reason}"]
                    entry["status"] = ClientStatus.ERROR
            else:
                replied += 1
                try:
                    update, metrics = self._parse_reply(cid, reply)
                except (UpdateError, KeyError, ValueError, TypeError) as e:
                    outcome.dropped[cid] = [f"malformed reply: {e}"]
                    entry["status"] = ClientStatus.REJECTED
                else:
                    outcome.bytes_up += factor_bytes(update.modules.values())
                    entry.update(status=ClientStatus.OK, **metrics_entry(metrics))
                    outcome.updates.append(update)
            outcome.entries.append(entry)
        return _Attempt(plan, outcome, replied, nodes)

    @staticmethod
    def _parse_reply(cid: str, reply) -> tuple[ClientUpdate, dict[str, Any]]:
        meta = reply.content["meta"]
        names, scales = list(meta["modules"]), list(meta["scales"])
        if len(names) != len(scales):
            raise UpdateError("modules and scales differ in length")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in scales):
            raise UpdateError("scales must be positive finite numbers")
        if str(meta["client-id"]) != cid:
            raise UpdateError(f"reply claims client {meta['client-id']}, expected {cid}")
        factors = arrays_to_factors(reply.content["update"], dict(zip(names, scales)))
        metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
        if "text-metrics" in reply.content:
            metrics.update({k: str(v) for k, v in reply.content["text-metrics"].items()})
        return ClientUpdate(client_id=cid, num_examples=int(meta["num-examples"]), modules=factors), metrics

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole run; ``summary.json`` says ``completed``, or ``stopped`` with the reason and the
        last good round. A stopped run raises :class:`FlowerRunError`, so the ServerApp process exits
        with Flower's code 201 (SERVERAPP_EXCEPTION) and `flwr ls` shows the run as failed;
        `flwr run --stream` exits 0 all the same, `flexlora status OUT` exits 1."""
        try:
            self.discover()
            from flexlora.runner import run_rounds

            summary = run_rounds(self.server, self.output, self.round, resume=self.settings.resume)
        except FlowerRunError as e:
            LOG.error("flexlora: %s", e)
            self._stop(str(e))
            raise
        summary.update(self._flower_summary(), status="completed")
        _write_json(self.out / SUMMARY, summary)
        return summary

    def _flower_summary(self) -> dict[str, Any]:
        return {
            "engine": "flower",
            "nodes": {
                str(cid): {"node_id": self.node_of[cid], "type": self.engine.fed.types[cid], **self.profiles[cid].to_config(), **({"rejoined": self.rejoins[cid]} if cid in self.rejoins else {})}
                for cid in sorted(self.profiles)
            },
            "min_clients": self.min_clients,
            "round_timeout": self.settings.round_timeout,
        }

    def _stop(self, reason: str) -> None:
        """Write the final adapters and summary of the last good state (the last checkpoint)."""
        from flexlora.checkpoint import load_checkpoint, state_from_dict
        from flexlora.output import METRICS, read_metrics

        engine, server = self.engine, self.server
        if not self.profiles:  # stopped before the federation was set up: nothing trained
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / SUMMARY, {"engine": "flower", "status": "stopped", "reason": reason, "error": reason, "last_good_round": 0})
            return
        last = max(0, self.failed_round - 1)
        ckpt = load_checkpoint(self.out) if last else None
        kept = self.output.last_good
        if kept is not None and kept[0] == last:  # the whole state of the last good round, still in memory
            state = kept[1]
        elif ckpt is not None and int(ckpt["round"]) == last:
            state, engine.merged = state_from_dict(ckpt["state"]), ckpt["merged"]
        else:
            state, engine.merged, last = engine.method.initial_state(engine.fed.shapes), {}, 0
        summary = self.output.finish(server.summary(read_metrics(self.out / METRICS, upto=last)), lambda folder: server.write_global_adapters(state, folder))
        summary.update(self._flower_summary(), status="stopped", reason=reason, error=reason, last_good_round=last)
        if state.info.get("stored_ranks") == "servable":  # only when restored from a checkpoint between rounds
            summary["final_adapters_note"] = "the top singular triplets up to the largest rank any node is served (the checkpoint of a round before the last)"
        _write_json(self.out / SUMMARY, summary)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from flexlora.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def run_status(folder: str | Path) -> tuple[int, str]:
    """What a run folder's ``summary.json`` says, as an exit code (0 completed, 1 anything else) and
    one line: what an operator's script checks after `flwr run --stream`, which exits 0 either way."""
    path = Path(folder) / SUMMARY
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 1, f"{folder}: no {SUMMARY} (the run is still going, or ended without writing one: see `flwr log`)"
    except ValueError as e:
        return 1, f"{path}: unreadable ({e})"
    status = summary.get("status", "completed")  # the simulator's summaries carry no status: they exist only when complete
    if status == "completed":
        return 0, f"completed: {summary.get('rounds')} round(s), {summary.get('dropped_updates', 0)} dropped update(s); final adapters in {summary.get('final_adapters')}"
    reason = summary.get("reason") or summary.get("error") or "no reason recorded"
    return 1, f"{status} (last good round {summary.get('last_good_round', '?')}): {reason}"


def server_main(grid, context: "Context") -> dict[str, Any]:
    """The ServerApp's main: run config -> settings -> :class:`FlowerServer`."""
    settings = FlowerSettings.from_run_config(dict(context.run_config))
    return FlowerServer(grid, settings).run()
