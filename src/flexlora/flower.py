"""The Flower deployment layer: payloads, the node's handlers and the server's round.

The Flower App in ``flower_app/`` is a thin shell over this module, and this module is a thin
layer over the same core as the in-process simulator: the server side builds a
:class:`flexlora.simulate.Simulation` (model, data, federation, method, evaluation, metrics,
checkpoints, final adapters) and replaces only the local-training loop of a round by messages to
the nodes; planning, validation, aggregation and diagnostics run in the round engine (:mod:`flexlora.rounds`). The node
side trains with :meth:`flexlora.train.LocalTrainer.train_client`, exactly as the simulator does.

Messages (Flower's Message API, one message per node, so every node gets its own ranks):

* ``query`` (server -> node): the run config; the node answers with its partition id (its client
  id), rank type or explicit ranks, memory budget and number of training examples, declared with
  ``--node-config`` in a deployment or derived from the partition id in Flower's simulation.
* ``train`` (server -> node): the round, the training seed, the node's per-module spec and its
  share of the global adapter (float32 factors; FLoRA adds the merged base update in float64);
  the node answers with its trained factors, their scales, its number of examples and the
  training metrics.

flwr is imported only by the functions that need it: ``import flexlora.flower`` works without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from flexlora.rounds import ClientStatus
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec, ServerState, UpdateError

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message

    from flexlora.config import RunConfig
    from flexlora.rounds import RoundOutcome, RoundPlan
    from flexlora.simulate import Simulation

LOG = logging.getLogger("flwr.flexlora")  # a child of Flower's logger: shows in `flwr log` / `--stream`

QUERY = "query"
TRAIN = "train"
SUMMARY = "summary.json"

# The run config of the Flower App (`[tool.flwr.app.config]`), with its defaults.
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "",  # flexlora TOML config ("" = built-in defaults); absolute, or relative to the ServerApp's cwd
    "set": "",  # overrides, "federation.rounds=4; train.lr=1e-4"
    "aggregation": "",  # method override: flexlora | fedavg | hetlora | flora | ffa | rank_partition
    "out": "runs/flower",  # run folder: metrics.jsonl, checkpoints, summary.json, final/
    "resume": False,
    "round-timeout": 600.0,  # seconds a round waits for replies; late nodes are left out of that round
    "min-clients": 0,  # a round needs replies from this many nodes (0: federation.min_clients)
    "round-retries": 1,  # a round without enough replies is retried this often, then the run stops
    "min-nodes": 1,  # nodes to wait for before the first round
    "node-wait-timeout": 120.0,  # seconds to wait for them (and for their answers to the query)
}


class FlowerRunError(RuntimeError):
    """The Flower run cannot go on (too few nodes, too few replies); the message says why."""


def _flwr():
    try:
        import flwr.app as app
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Flower layer needs flwr: pip install 'flexlora[flower]'") from e
    return app


# -- payload encoding ----------------------------------------------------------------------------
def factors_to_arrays(factors: Mapping[str, LoraFactors], dtype: torch.dtype = torch.float32) -> "ArrayRecord":
    """``{name}.A`` / ``{name}.B`` arrays (C-order, ``dtype``) in an ArrayRecord."""
    app = _flwr()
    arrays = {}
    for name, f in factors.items():
        arrays[f"{name}.A"] = app.Array(f.A.detach().to(dtype).contiguous().numpy())
        arrays[f"{name}.B"] = app.Array(f.B.detach().to(dtype).contiguous().numpy())
    return app.ArrayRecord(arrays)


def arrays_to_tensors(record: "ArrayRecord") -> dict[str, Tensor]:
    return {key: torch.from_numpy(arr.numpy().copy()) for key, arr in record.items()}


def arrays_to_factors(record: "ArrayRecord", scales: Mapping[str, float]) -> dict[str, LoraFactors]:
    """Factors back from ``factors_to_arrays``; ``scales`` name the modules. Raises UpdateError
    (naming the module) for a missing, extra or malformed array."""
    tensors = arrays_to_tensors(record)
    expected = {f"{n}.{w}" for n in scales for w in "AB"}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UpdateError(f"unexpected arrays {extra[:3]} (no scale declared for them)")
    out = {}
    for name, scale in scales.items():
        if f"{name}.A" not in tensors or f"{name}.B" not in tensors:
            raise UpdateError(f"module {name}: lora_A or lora_B missing from the payload")
        out[name] = LoraFactors(A=tensors[f"{name}.A"], B=tensors[f"{name}.B"], scale=float(scale))
    return out


def spec_to_config(spec: Mapping[str, ModuleSpec]) -> "ConfigRecord":
    app = _flwr()
    names = list(spec)  # the spec's order is the optimizer's parameter order: keep it
    return app.ConfigRecord(
        {
            "modules": names,
            "ranks": [int(spec[n].rank) for n in names],
            "alphas": [float(spec[n].alpha) for n in names],
            "rslora": [bool(spec[n].rslora) for n in names],
        }
    )


def config_to_spec(record: Mapping[str, Any]) -> dict[str, ModuleSpec]:
    names, ranks, alphas, rs = (list(record[k]) for k in ("modules", "ranks", "alphas", "rslora"))
    if not len(names) == len(ranks) == len(alphas) == len(rs):
        raise UpdateError("spec payload: modules, ranks, alphas and rslora differ in length")
    return {n: ModuleSpec(rank=int(r), alpha=float(a), rslora=bool(s)) for n, r, a, s in zip(names, ranks, alphas, rs)}


def message_nbytes(message: "Message") -> int:
    """Bytes of a message as Flower ships it: every object (message, records, arrays, array
    chunks) deflated, as pushed to / pulled from the SuperLink (HTTP framing not included)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def config_to_json(cfg: "RunConfig") -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


# A node's --node-config keys that replace keys of the server's run config on that node.
NODE_OVERRIDES = {"data-path": ("data", "path"), "model-source": ("model", "source"), "device": ("model", "device"), "dtype": ("model", "dtype")}


def config_from_json(text: str, node_config: Mapping[str, Any] | None = None) -> "RunConfig":
    """The run config as this machine sees it: a node's own paths and device replace the server's
    before anything is checked (the server's data path need not exist on the node)."""
    from flexlora.config import RunConfig, from_dict, validate

    data = json.loads(text)
    for key, (section, field_name) in NODE_OVERRIDES.items():
        if node_config and node_config.get(key):
            data.setdefault(section, {})[field_name] = str(node_config[key])
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


# -- the node -------------------------------------------------------------------------------------
@dataclass
class NodeProfile:
    """What a node declares about itself (``--node-config``), and its training-set size."""

    partition_id: int
    num_examples: int
    rank_type: str | None = None
    group_ranks: dict[str, int] | None = None  # explicit ranks, e.g. {"attention": 16, "mlp": 64}
    budget_mib: float | None = None

    def to_config(self) -> dict[str, Any]:
        d: dict[str, Any] = {"partition-id": self.partition_id, "num-examples": self.num_examples}
        if self.rank_type:
            d["rank-type"] = self.rank_type
        for group, r in (self.group_ranks or {}).items():
            d[f"rank-{group}"] = int(r)
        if self.budget_mib is not None:
            d["budget-mib"] = float(self.budget_mib)
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> "NodeProfile":
        ranks = {k[len("rank-") :]: int(v) for k, v in d.items() if k.startswith("rank-") and k != "rank-type"}
        return cls(
            partition_id=int(d["partition-id"]),
            num_examples=int(d["num-examples"]),
            rank_type=str(d["rank-type"]) if d.get("rank-type") else None,
            group_ranks=ranks or None,
            budget_mib=float(d["budget-mib"]) if "budget-mib" in d else None,
        )


def _partition_id(node_config: Mapping[str, Any]) -> int:
    if "partition-id" not in node_config:
        raise ValueError("this node has no partition-id: start it with --node-config 'partition-id=N ...' (N = its client id)")
    return int(node_config["partition-id"])


class NodeRuntime:
    """A node's model, tokenizer, trainer and data for one run config (kept between messages
    when Flower reuses the process, e.g. in the in-process test grid)."""

    _cache: dict[str, "NodeRuntime"] = {}

    def __init__(self, cfg: "RunConfig", with_model: bool) -> None:
        from flexlora.simulate import load_clients

        self.cfg = cfg
        self.clients = {c.client_id: c for c in load_clients(cfg)}
        self.model = self.tokenizer = self.trainer = None
        self.originals: dict[str, Tensor] = {}
        if with_model:
            self.load_model()

    def load_model(self) -> None:
        if self.trainer is not None:
            return
        from flexlora.methods import get_method
        from flexlora.models import load_model
        from flexlora.resources import target_module_names
        from flexlora.train import LocalTrainer

        self.model, self.tokenizer = load_model(self.cfg.model)
        method = get_method(self.cfg.federation.aggregation, **dict(self.cfg.federation.method_options))  # its client side only
        self.trainer = LocalTrainer(self.model, self.tokenizer, self.cfg.lora.targets, method.local_training(self.cfg.train), method.local_penalty(self.cfg.train))
        shapes = target_module_names(self.model, self.cfg.lora.targets)
        self.originals = {n: self.model.get_submodule(n).weight.detach().clone() for n in shapes}

    @classmethod
    def get(cls, cfg: "RunConfig", with_model: bool) -> "NodeRuntime":
        key = hashlib.sha256(config_to_json(cfg).encode()).hexdigest()
        rt = cls._cache.get(key)
        if rt is None:
            cls._cache.clear()  # one run config at a time
            rt = cls._cache[key] = NodeRuntime(cfg, with_model)
        elif with_model:
            rt.load_model()
        return rt

    def client(self, partition_id: int):
        c = self.clients.get(partition_id)
        if c is None:
            raise ValueError(f"partition-id {partition_id}: no such client in this node's data ({len(self.clients)} clients)")
        if c.heldout or not c.train:
            raise ValueError(f"partition-id {partition_id}: this client is held out for evaluation or has no training data")
        return c


def node_profile(node_config: Mapping[str, Any], cfg: "RunConfig") -> NodeProfile:
    """The node's answer to the query: its declared resources and its number of examples."""
    pid = _partition_id(node_config)
    client = NodeRuntime.get(cfg, with_model=False).client(pid)
    declared = {k: v for k, v in node_config.items() if k.startswith("rank-") or k == "budget-mib"}
    return NodeProfile.from_config({**declared, "partition-id": pid, "num-examples": client.num_examples})


def handle_query(msg: "Message", context: "Context") -> "Message":
    """ClientApp ``query``: report this node's profile."""
    app = _flwr()
    cfg = config_from_json(str(msg.content["config"]["run-config"]), context.node_config)
    profile = node_profile(context.node_config, cfg)
    return app.Message(app.RecordDict({"profile": app.ConfigRecord(profile.to_config())}), reply_to=msg)


def handle_train(msg: "Message", context: "Context") -> "Message":
    """ClientApp ``train``: load the share at this node's ranks, train locally, send the factors."""
    app = _flwr()
    from flexlora.train import apply_dense_delta

    conf = msg.content["config"]
    cfg = config_from_json(str(conf["run-config"]), context.node_config)
    pid = _partition_id(context.node_config)
    if int(conf["client-id"]) != pid:
        raise ValueError(f"message for client {conf['client-id']} reached the node with partition-id {pid}")
    rt = NodeRuntime.get(cfg, with_model=True)
    client = rt.client(pid)
    spec = config_to_spec(msg.content["spec"])
    share = arrays_to_factors(msg.content["share"], {n: s.scale for n, s in spec.items()})
    merged = arrays_to_tensors(msg.content["base"]) if "base" in msg.content else {}
    apply_dense_delta(rt.model, merged, rt.originals)  # FLoRA: W = W0 + everything merged so far
    try:
        result = rt.trainer.train_client(client, spec, share, seed=int(conf["seed"]))
    finally:
        rt.model = rt.trainer.model
        apply_dense_delta(rt.model, {}, rt.originals)
    names = list(result.update.modules)  # the order the server's simulator would see them in
    content = app.RecordDict(
        {
            "update": factors_to_arrays({n: result.update.modules[n] for n in names}),
            "meta": app.ConfigRecord(
                {
                    "client-id": pid,
                    "num-examples": int(result.update.num_examples),
                    "modules": names,
                    "scales": [float(result.update.modules[n].scale) for n in names],
                }
            ),
            "metrics": app.MetricRecord({k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}),
        }
    )
    return app.Message(content, reply_to=msg)


# -- the server -----------------------------------------------------------------------------------
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
    """The ServerApp's work: discover the nodes, then run the simulator's loop with rounds whose
    local training happens on the nodes."""

    def __init__(self, grid, settings: FlowerSettings, sim: "Simulation | None" = None) -> None:
        from flexlora.simulate import Simulation

        from flexlora.config import ConfigError

        self.grid = grid
        self.settings = settings
        cfg = settings.run_config()
        if cfg.federation.algorithm == "slora":
            raise ConfigError(
                "federation.algorithm = 'slora' does not run on Flower yet: its sparse first stage trains full weight "
                "updates that this app does not ship; use fedit or fedavg (any aggregation method works)"
            )
        self.cfg = cfg
        self.out = Path(settings.out).expanduser().resolve()
        self.sim = sim if sim is not None else Simulation(cfg, self.out, progress=False)
        self.config_json = config_to_json(cfg)
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.profiles: dict[int, NodeProfile] = {}  # client id -> profile
        self.min_clients = settings.min_clients or max(1, cfg.federation.min_clients)
        self.failed_round = 0

    # -- set-up ------------------------------------------------------------------------------------
    def discover(self) -> None:
        """Wait for ``min-nodes`` nodes, ask each for its profile, and make them the federation."""
        app = _flwr()
        s = self.settings
        deadline = time.monotonic() + s.node_wait_timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < s.min_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        if len(nodes) < s.min_nodes:
            raise FlowerRunError(f"only {len(nodes)} node(s) connected within {s.node_wait_timeout:g}s, fewer than min-nodes={s.min_nodes}")
        LOG.info("flexlora: %d node(s) connected; asking for their ranks and data sizes", len(nodes))
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
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=s.node_wait_timeout)}
        for n in nodes:
            r = replies.get(n)
            if r is None:
                LOG.warning("flexlora: node %s did not answer the query in time; it is not part of this run", n)
                continue
            if r.has_error():
                LOG.warning("flexlora: node %s answered the query with an error (%s); it is not part of this run", n, r.error.reason)
                continue
            try:
                p = NodeProfile.from_config(r.content["profile"])
            except (KeyError, ValueError, TypeError) as e:
                LOG.warning("flexlora: node %s sent a malformed profile (%s); it is not part of this run", n, e)
                continue
            if p.partition_id in self.node_of:
                raise FlowerRunError(f"nodes {self.node_of[p.partition_id]} and {n} both declare partition-id {p.partition_id}; give every node its own")
            self.node_of[p.partition_id] = n
            self.profiles[p.partition_id] = p
        if len(self.profiles) < s.min_nodes:
            raise FlowerRunError(f"only {len(self.profiles)} node(s) answered the query, fewer than min-nodes={s.min_nodes}")
        self.apply_profiles()
        for cid, p in sorted(self.profiles.items()):
            LOG.info("flexlora: node %s = client %d, type %s, %d examples", self.node_of[cid], cid, self.sim.fed.types[cid], p.num_examples)

    def apply_profiles(self) -> None:
        """Make the federation the nodes': their ids, ranks and data sizes."""
        from flexlora.config import ConfigError
        from flexlora.data.types import ClientData
        from flexlora.rounds import Federation, rank_policy, resource_types

        fed = self.sim.fed
        policy, types_def = rank_policy(self.cfg), resource_types(self.cfg)
        train, types, specs, notes = [], {}, {}, set(fed.notes)
        for cid, p in sorted(self.profiles.items()):
            if p.group_ranks:
                t, ranks = "custom-" + "-".join(f"{g}{r}" for g, r in sorted(p.group_ranks.items())), p.group_ranks
            elif p.rank_type:
                if p.rank_type not in types_def:
                    raise ConfigError(f"node {self.node_of[cid]} (client {cid}) declares rank-type {p.rank_type!r}, not one of {sorted(types_def)}")
                t, ranks = p.rank_type, types_def[p.rank_type]
            elif cid in fed.types:  # Flower's simulation: the type follows from the partition id
                t = fed.types[cid]
                ranks = types_def[t]
            else:
                raise ConfigError(f"node {self.node_of[cid]} (client {cid}) declares no rank-type and its partition id is not a training client of the config")
            try:
                specs[cid], n = policy.module_ranks(ranks, fed.shapes)
            except ValueError as e:
                raise ConfigError(f"node {self.node_of[cid]} (client {cid}): {e}") from None
            notes.update(n)
            types[cid] = t
            train.append(ClientData(client_id=cid, category="flower-node", train=[], eval=[], num_train_full=p.num_examples, flags=[f"node:{self.node_of[cid]}"]))
        self.sim.engine.set_federation(Federation(train, fed.eval_clients, fed.shapes, types, specs, sorted(notes)))

    # -- one round ---------------------------------------------------------------------------------
    def round(self, rnd: int, state: ServerState, bar=None) -> tuple[dict[str, Any], ServerState]:
        """``Simulation.run``'s round: train on the nodes (retrying a round without enough
        replies), then the simulator's server half."""
        s = self.settings
        failed: list[dict[str, Any]] = []
        for attempt in range(1, s.round_retries + 2):
            a = self._attempt(rnd, state)
            if a.replied >= self.min_clients:
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
        for cid, reasons in a.outcome.dropped.items():
            LOG.warning("flexlora: round %d: client %s left out: %s", rnd, cid, "; ".join(reasons))
        rec, new_state = self.sim.engine.close(a.plan, state, a.outcome)
        rec["flower"] = {"attempts": attempt, "failed_attempts": failed, "nodes": a.nodes, "round_seconds": a.outcome.train_seconds}
        ok = sum(1 for e in rec["clients"] if e.get("status") == ClientStatus.OK)
        LOG.info("flexlora: round %d done: %d update(s) aggregated, %d client(s) left out%s", rnd, ok, len(rec["dropped"]), " (round skipped)" if "skipped" in rec else "")
        return rec, new_state

    def _attempt(self, rnd: int, state: ServerState) -> _Attempt:
        """Plan the round with the engine, send every node its own message, collect the replies."""
        from flexlora.rounds import RoundOutcome, factor_bytes, metrics_entry

        app = _flwr()
        engine, s = self.sim.engine, self.settings
        plan = engine.plan(rnd, state, budgets={cid: p.budget_mib for cid, p in self.profiles.items()})
        base = app.ArrayRecord({n: app.Array(d.contiguous().numpy()) for n, d in sorted(plan.base.items())}) if plan.base else None
        messages = []
        for planned in plan.clients:
            content = {
                "config": app.ConfigRecord(
                    {"run-config": self.config_json, "round": rnd, "client-id": planned.client.client_id, "seed": engine.train_seed(rnd, planned.client.client_id)}
                ),
                "spec": spec_to_config(planned.spec),
                "share": factors_to_arrays(planned.share),
            }
            if base is not None:
                content["base"] = base
            messages.append(
                app.Message(app.RecordDict(content), dst_node_id=self.node_of[planned.client.client_id], message_type=TRAIN, group_id=str(rnd), ttl=s.round_timeout)
            )
        sent = {m.metadata.dst_node_id: message_nbytes(m) for m in messages}
        replies: dict[int, Any] = {}
        for r in self.grid.send_and_receive(messages, timeout=s.round_timeout):
            replies.setdefault(r.metadata.src_node_id, r)

        outcome = RoundOutcome(updates=[], entries=[], dropped={}, bytes_up=0, train_seconds=time.perf_counter() - plan.started)
        nodes: dict[str, dict[str, Any]] = {}
        replied = 0
        for planned in plan.clients:
            cid, entry = planned.cid, planned.entry
            node = self.node_of[planned.client.client_id]
            reply = replies.get(node)
            nodes[cid] = {"node_id": node, "bytes_received": sent[node], "bytes_sent": message_nbytes(reply) if reply is not None else 0}
            if reply is None:
                outcome.dropped[cid] = [f"missed the round timeout ({s.round_timeout:g}s)"]
                entry["status"] = ClientStatus.TIMEOUT
            elif reply.has_error():
                outcome.dropped[cid] = [f"node error: {reply.error.reason}"]
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
        return ClientUpdate(client_id=cid, num_examples=int(meta["num-examples"]), modules=factors), metrics

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self.discover()
            summary = self.sim.run(resume=self.settings.resume, round_fn=self.round)
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
            "nodes": {str(cid): {"node_id": self.node_of[cid], "type": self.sim.fed.types[cid], **self.profiles[cid].to_config()} for cid in sorted(self.profiles)},
            "min_clients": self.min_clients,
            "round_timeout": self.settings.round_timeout,
        }

    def _stop(self, reason: str) -> None:
        """Write the final adapters and summary of the last good state (the last checkpoint)."""
        from flexlora.checkpoint import load_checkpoint, state_from_dict
        from flexlora.simulate import METRICS, read_metrics

        sim = self.sim
        if not self.profiles:  # stopped before the federation was set up: nothing trained
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / SUMMARY, {"engine": "flower", "status": "stopped", "error": reason, "last_good_round": 0})
            return
        last = max(0, self.failed_round - 1)
        ckpt = load_checkpoint(self.out) if last else None
        if ckpt is not None and int(ckpt["round"]) == last:
            state, sim.merged = state_from_dict(ckpt["state"]), ckpt["merged"]
        else:
            state, sim.merged, last = sim.method.initial_state(sim.fed.shapes), {}, 0
        summary = sim.finish(state, read_metrics(self.out / METRICS, upto=last))
        summary.update(self._flower_summary(), status="stopped", error=reason, last_good_round=last)
        _write_json(self.out / SUMMARY, summary)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from flexlora.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def server_main(grid, context: "Context") -> dict[str, Any]:
    """The ServerApp's main: run config -> settings -> :class:`FlowerServer`."""
    settings = FlowerSettings.from_run_config(dict(context.run_config))
    return FlowerServer(grid, settings).run()
