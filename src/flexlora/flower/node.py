"""The node side (ClientApp handlers): report this node's profile, train on the share it is sent
(and, under ``[failures]``, inject this client's failures into its own reply, as the simulator does)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from torch import Tensor

from flexlora.failures import client_failure, garbage_update
from flexlora.flower.payloads import arrays_to_factors, arrays_to_tensors, config_from_json, config_to_json, config_to_spec, factors_to_arrays, flwr_app

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import Context, Message

    from flexlora.config import RunConfig


class InjectedFailure(RuntimeError):
    """A failure the node injects into its own reply (``[failures]`` of the run config)."""


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
        from flexlora.data.clients import load_clients

        self.cfg = cfg
        self.clients = {c.client_id: c for c in load_clients(cfg)}
        self.model = self.tokenizer = self.trainer = self.method = None
        self.originals: dict[str, Tensor] = {}
        if with_model:
            self.load_model()

    def load_model(self) -> None:
        if self.trainer is not None:
            return
        from flexlora.methods import get_method
        from flexlora.models import load_model
        from flexlora.resources import target_module_names
        from flexlora.train import LocalTrainer, use_deterministic_kernels

        if self.cfg.train.deterministic:
            use_deterministic_kernels()
        self.model, self.tokenizer = load_model(self.cfg.model)
        method = get_method(self.cfg.federation.aggregation, **dict(self.cfg.federation.method_options))  # its client side only
        self.method = method
        self.trainer = LocalTrainer(self.model, self.tokenizer, self.cfg.lora.targets, method.local_training(self.cfg.train), method.local_penalty(self.cfg.train))
        shapes = target_module_names(self.model, self.cfg.lora.targets)
        self.originals = {n: self.model.get_submodule(n).weight.detach().to("cpu", copy=True) for n in shapes}  # host memory

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
    app = flwr_app()
    cfg = config_from_json(str(msg.content["config"]["run-config"]), context.node_config)
    profile = node_profile(context.node_config, cfg)
    return app.Message(app.RecordDict({"profile": app.ConfigRecord(profile.to_config())}), reply_to=msg)


def handle_train(msg: "Message", context: "Context") -> "Message":
    """ClientApp ``train``: load the share at this node's ranks, train locally, send the factors."""
    app = flwr_app()
    from flexlora.train import apply_dense_delta

    conf = msg.content["config"]
    cfg = config_from_json(str(conf["run-config"]), context.node_config)
    pid = _partition_id(context.node_config)
    if int(conf["client-id"]) != pid:
        raise ValueError(f"message for client {conf['client-id']} reached the node with partition-id {pid}")
    failure, fail_rng = client_failure(cfg.federation.seed, cfg.failures, int(conf["round"]), pid)  # [failures]: what the simulator draws
    if failure == "crash":
        raise InjectedFailure("crashed during local training (failure injection: failures.crash)")
    if failure == "straggle":  # reply only once the round has closed
        time.sleep(max(0.0, msg.metadata.created_at + msg.metadata.ttl - time.time()) + 1.0)
        raise InjectedFailure("straggled past the round timeout (failure injection: failures.straggle)")
    rt = NodeRuntime.get(cfg, with_model=True)
    client = rt.client(pid)
    spec = config_to_spec(msg.content["spec"])
    share = arrays_to_factors(msg.content["share"], {n: s.scale for n, s in spec.items()})
    merged = arrays_to_tensors(msg.content["base"]) if "base" in msg.content else {}
    apply_dense_delta(rt.model, merged, rt.originals)  # FLoRA: W = W0 + everything merged so far
    rt.trainer.cfg = rt.method.local_training(cfg.train, round=int(conf["round"]))  # e.g. RoLoRA: the factor this round trains
    try:
        result = rt.trainer.train_client(client, spec, share, seed=int(conf["seed"]))
    finally:
        rt.model = rt.trainer.model
        apply_dense_delta(rt.model, {}, rt.originals)
    update = garbage_update(result.update, fail_rng) if failure == "garbage" else result.update
    names = list(update.modules)  # the order the server's simulator would see them in
    content = app.RecordDict(
        {
            "update": factors_to_arrays({n: update.modules[n] for n in names}),
            "meta": app.ConfigRecord(
                {
                    "client-id": pid,
                    "num-examples": int(result.update.num_examples),
                    "modules": names,
                    "scales": [float(update.modules[n].scale) for n in names],
                }
            ),
            "metrics": app.MetricRecord({k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}),
            # text metrics (e.g. the precision local training ran in) cannot go into a MetricRecord
            "text-metrics": app.ConfigRecord({k: v for k, v in result.metrics.items() if isinstance(v, str)}),
        }
    )
    return app.Message(content, reply_to=msg)
