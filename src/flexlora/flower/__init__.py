"""The Flower deployment layer: payloads (:mod:`.payloads`), the node's handlers (:mod:`.node`),
the server's run (:mod:`.server`), and :mod:`.strategy`, a Flower ``Strategy`` (FlexLoRAStrategy)
for other people's Flower apps, whose clients send PEFT LoRA state dicts at their own ranks, with
its message format (:mod:`.peft_messages`), each node's ranks (:mod:`.ranks`), its byte counts
(:mod:`.accounting`) and the helpers such a ClientApp imports (:mod:`.client`).

The Flower App in ``flower_app/`` is a thin shell over this module, and this module is a thin
layer over the same core as the in-process simulator: the server side builds the same run parts
(:func:`flexlora.runner.open_run`: model, data, method, round engine, evaluation and final adapters;
:class:`flexlora.output.RunOutput`: metrics, checkpoints, summary) and runs the same loop
(:func:`flexlora.runner.run_rounds`) with a round whose local training is messages to the nodes;
planning, validation, aggregation and diagnostics run in the round engine (:mod:`flexlora.rounds`). The node
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

from flexlora.flower.node import NodeProfile, NodeRuntime, handle_query, handle_train, node_profile
from flexlora.flower.payloads import (
    NODE_OVERRIDES,
    QUERY,
    RUN_CONFIG_DEFAULTS,
    SUMMARY,
    TRAIN,
    FlowerRunError,
    arrays_to_factors,
    arrays_to_tensors,
    config_from_json,
    config_to_json,
    config_to_spec,
    factors_to_arrays,
    message_nbytes,
    spec_to_config,
)
from flexlora.flower.server import FlowerServer, FlowerSettings, run_status, server_main

__all__ = [
    "NODE_OVERRIDES", "QUERY", "RUN_CONFIG_DEFAULTS", "SUMMARY", "TRAIN", "FlowerRunError", "FlowerServer", "FlowerSettings",
    "NodeProfile", "NodeRuntime", "arrays_to_factors", "arrays_to_tensors", "config_from_json", "config_to_json", "config_to_spec",
    "factors_to_arrays", "handle_query", "handle_train", "message_nbytes", "node_profile", "run_status", "server_main", "spec_to_config",
]


def __getattr__(name: str):
    """The Strategy subclasses Flower's, so it (and flwr) is imported only when asked for."""
    if name in ("FlexLoRAStrategy", "StrategyConfig"):
        from flexlora.flower import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module 'flexlora.flower' has no attribute {name!r}")
