"""The client side of :class:`~flexlora.flower.strategy.FlexLoRAStrategy` for a FlowerTune-style
ClientApp (transformers + PEFT, its own loop or the HF Trainer): three calls instead of hand-written
message handling.

.. code-block:: python

    from flexlora.flower.client import answer_query, load_share, train_reply

    @app.query()
    def query(msg, context):  # the strategy asks once: "at which ranks do you train?"
        return answer_query(msg, my_lora_config(context))  # a peft.LoraConfig at this node's ranks

    @app.train()
    def train(msg, context):
        model = get_peft_model(base_model, my_lora_config(context))
        load_share(model, msg)  # instead of set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
        ...  # train as before
        return train_reply(msg, model, num_examples=len(trainset), metrics={"train_loss": loss})

``load_share`` loads a share at any ranks into the node's model: at the model's ranks it is
``set_peft_model_state_dict``; at other ranks (a node the strategy has not heard from yet) each
module gets the rank-r representation of the share's update ``s B A`` (exact when the model's rank
is larger, the best rank-r approximation when it is smaller) and a warning says so; the reply then
tells the strategy the node's ranks. Needs torch, flwr and (for the model) PEFT; nothing of the
server's (no aggregation methods). Tested with FlowerTune's pins, transformers 4.53.0 and PEFT 0.6.2
(``scripts/client_floor_check.sh``), and with the versions ``make`` installs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from flexlora.flower.payloads import arrays_to_tensors, tensors_to_arrays
from flexlora.flower.peft_messages import ARRAYS, CONFIG, LORA_CONFIG, METRICS, NUM_EXAMPLES, TRANSPORT, lora_settings
from flexlora.lowrank import svd_of_product
from flexlora.peft_io import AdapterError, factors_from_state_dict, state_dict_from_factors
from flexlora.update import LoraFactors

LOG = logging.getLogger("flwr.flexlora.client")


def answer_query(msg: Message, lora_config: Any) -> Message:
    """The reply to the strategy's query: this node's LoRA config (a ``peft.LoraConfig``, an
    adapter_config dict or the PEFT model's ``peft_config["default"]``), so its very first share is
    at its own ranks."""
    return Message(RecordDict({CONFIG: ConfigRecord({LORA_CONFIG: json.dumps(lora_settings(lora_config), sort_keys=True)})}), reply_to=msg)


def received_state_dict(msg: Message) -> dict[str, torch.Tensor]:
    """The share in a train/evaluate message as a PEFT LoRA state dict (bfloat16 transport undone)."""
    conf = msg.content[CONFIG] if CONFIG in msg.content else {}
    return arrays_to_tensors(msg.content[ARRAYS], str(conf.get(TRANSPORT, "float32")))


def load_share(model: Any, msg: Message, adapter_name: str = "default") -> dict[str, tuple[int, int]]:
    """Load the share in ``msg`` into the PEFT ``model`` whatever its ranks; returns the modules
    whose rank differed, ``{module: (share rank, model rank)}`` (empty when the ranks match)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    conf = msg.content[CONFIG] if CONFIG in msg.content else {}
    own_settings = lora_settings(model.peft_config[adapter_name])
    own, own_spec = factors_from_state_dict(get_peft_model_state_dict(model, adapter_name=adapter_name), own_settings, where="this node's PEFT model")
    described = LORA_CONFIG in conf
    share, share_spec = factors_from_state_dict(
        received_state_dict(msg), lora_settings(str(conf[LORA_CONFIG])) if described else own_settings, where="the share", infer_ranks=not described
    )
    if set(share) != set(own):
        missing, extra = sorted(set(own) - set(share)), sorted(set(share) - set(own))
        raise AdapterError(f"the share's modules differ from this model's (missing {missing[:3]}, unexpected {extra[:3]})")
    differ = {n: (share_spec[n].rank, own_spec[n].rank) for n in own if share_spec[n].rank != own_spec[n].rank}
    if differ:
        share = {n: (at_rank(f, own[n], own_spec[n].scale) if n in differ else f) for n, f in share.items()}
        name, (sent, have) = next(iter(sorted(differ.items())))
        LOG.warning("load_share: the share's ranks differ from this model's in %d module(s) (e.g. %s: %d vs %d); each gets the share's update at its own rank "
                    "(this reply tells the strategy this node's ranks)", len(differ), name, sent, have)
    set_peft_model_state_dict(model, state_dict_from_factors(share), adapter_name=adapter_name)
    return differ


def at_rank(share: LoraFactors, own: LoraFactors, scale: float) -> LoraFactors:
    """``share``'s update ``s B A`` as factors at ``own``'s rank and ``scale``: exact when that rank
    is at least the share's (the extra columns of B are zero, the extra rows of A are ``own``'s, so
    they can still learn), else the best approximation of that rank (truncated SVD)."""
    r, k = own.rank, share.rank
    B_eff = share.B.double() * share.scale
    if r >= k:
        B = torch.zeros(own.B.shape, dtype=torch.float64)
        B[:, :k] = B_eff / scale
        A = own.A.detach().double().clone()
        A[:k] = share.A.double()
    else:
        svd = svd_of_product(B_eff, share.A.double(), keep=r)
        B, A = svd.U[:, :r] * svd.S[:r] / scale, svd.Vh[:r]
    return LoraFactors(A=A.to(own.A.dtype), B=B.to(own.B.dtype), scale=scale)


def train_reply(msg: Message, model: Any, num_examples: int, metrics: Mapping[str, float] | None = None, adapter_name: str = "default") -> Message:
    """The reply to a train message: the trained PEFT LoRA state dict (in the transport dtype the
    share came in), ``num-examples`` and ``metrics``, and this node's LoRA config."""
    from peft import get_peft_model_state_dict

    conf = msg.content[CONFIG] if CONFIG in msg.content else {}
    transport = str(conf.get(TRANSPORT, "float32"))
    content = RecordDict(
        {
            ARRAYS: tensors_to_arrays(get_peft_model_state_dict(model, adapter_name=adapter_name), transport),
            METRICS: MetricRecord({**{k: float(v) for k, v in (metrics or {}).items()}, NUM_EXAMPLES: int(num_examples)}),
            CONFIG: ConfigRecord({LORA_CONFIG: json.dumps(lora_settings(model.peft_config[adapter_name]), sort_keys=True), TRANSPORT: transport}),
        }
    )
    return Message(content, reply_to=msg)
