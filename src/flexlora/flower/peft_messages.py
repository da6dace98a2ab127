"""The messages :class:`~flexlora.flower.strategy.FlexLoRAStrategy` and a PEFT ClientApp (a
FlowerTune-style client) exchange: record keys, the LoRA config that travels as JSON, and what a
failed ``set_peft_model_state_dict`` tells about the node's ranks.

Both sides import this module; it needs torch, and flwr only through :mod:`.payloads`' encoders.

* train/evaluate (server -> node): ``"arrays"``: the node's share as a PEFT LoRA state dict;
  ``"config"``: the caller's train/evaluate config plus ``"server-round"``, ``"lora-config"``
  (JSON: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` of the share)
  and ``"transport-dtype"`` (float32, float16 or bfloat16; bfloat16 travels as int16 bits), and
  ``"trained-factors"`` (``"A,B"``, or the one factor a client trains this round: ``"B"`` for FFA-LoRA,
  alternating for RoLoRA; the client freezes the other, ``requires_grad_(False)`` on its weights).
* train reply (node -> server): ``"arrays"``: the trained PEFT LoRA state dict; ``"metrics"`` with
  ``"num-examples"``; optionally ``"config"`` with ``"lora-config"`` and ``"transport-dtype"``.
* query (server -> node, once per node the strategy has not heard from): the answer's
  ``"config"["lora-config"]`` gives the node's ranks before its first round.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexlora.flower.payloads import arrays_to_tensors
from flexlora.peft_io import adapter_config, factors_from_state_dict, module_of_key
from flexlora.rounds import tensor_bytes
from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
LORA_CONFIG = "lora-config"
TRANSPORT = "transport-dtype"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
TRAINED_FACTORS = "trained-factors"  # "A,B", or the one factor the method trains this round (FFA-LoRA: "B"; RoLoRA alternates)
LORA_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")


def lora_settings(config: Any) -> dict[str, Any]:
    """The rank/alpha part of a LoRA config: a ``peft.LoraConfig``, an adapter_config.json dict, or a
    JSON string of either (what travels as ``"lora-config"``)."""
    if isinstance(config, str):
        config = json.loads(config)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"a LoRA config must be a peft.LoraConfig or a mapping, got {type(config).__name__}")
    out = {k: config[k] for k in LORA_KEYS if k in config and config[k] is not None}
    for k in ("rank_pattern", "alpha_pattern"):
        out[k] = dict(out.get(k) or {})
    return out


def spec_to_lora_settings(spec: Mapping[str, ModuleSpec]) -> dict[str, Any]:
    """Per-module ranks as a LoRA config: the most common rank/alpha, the rest in the patterns."""
    return {k: v for k, v in adapter_config(spec).items() if k in LORA_KEYS}


# torch's Module.load_state_dict (which set_peft_model_state_dict calls) lists every shape it cannot load:
# "size mismatch for <key>: copying a param with shape torch.Size([8, 32]) from checkpoint, the shape in current model is torch.Size([4, 32])."
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>\S+): copying a param with shape torch\.Size\(\[(?P<sent>[\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[(?P<model>[\d, ]*)\]\)"
)


def ranks_from_load_error(reason: str) -> dict[str, tuple[int, int]] | None:
    """``{module: (rank sent, rank of the node's model)}`` read from a node's error reply when it is
    torch's size-mismatch error of loading a LoRA share into a model at other ranks (a client that
    calls ``set_peft_model_state_dict`` on whatever it is sent); None for any other error."""
    out: dict[str, tuple[int, int]] = {}
    for m in _SIZE_MISMATCH.finditer(reason):
        parsed = module_of_key(m["key"])
        sent = [int(x) for x in m["sent"].split(",") if x.strip()]
        have = [int(x) for x in m["model"].split(",") if x.strip()]
        if parsed is None or len(sent) != 2 or len(have) != 2:
            continue
        module, which = parsed
        out[module] = (sent[0], have[0]) if which == "A" else (sent[1], have[1])
    return out or None


def is_load_error(reason: str) -> bool:
    """Whether a node's error reply says it could not load the share it was sent."""
    return "size mismatch for" in reason or "Error(s) in loading state_dict" in reason


@dataclass
class ParsedReply:
    update: ClientUpdate
    spec: dict[str, ModuleSpec]
    metrics: dict[str, float]
    payload_bytes: int = 0  # the factors as they travelled (their transport dtype)


def parse_reply(msg: Any, declared: Mapping[str, Any]) -> ParsedReply:
    """A node's train reply as a :class:`~flexlora.update.ClientUpdate` (float32 factors) with its
    spec: ranks and alpha from the reply's ``"lora-config"``, else ranks from the shapes and alpha
    / rsLoRA from ``declared``. Raises KeyError / ValueError / AdapterError naming the problem."""
    node = int(msg.metadata.src_node_id)
    content = msg.content
    if ARRAYS not in content:
        raise KeyError(f"the reply has no {ARRAYS!r} ArrayRecord")
    if METRICS not in content or NUM_EXAMPLES not in content[METRICS]:
        raise KeyError(f"the reply has no {NUM_EXAMPLES!r} in its {METRICS!r} MetricRecord")
    n = content[METRICS][NUM_EXAMPLES]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not float(n).is_integer() or n < 1:
        raise ValueError(f"{NUM_EXAMPLES} must be a positive integer, got {n!r}")
    conf = content[CONFIG] if CONFIG in content else {}
    described = LORA_CONFIG in conf
    settings = lora_settings(str(conf[LORA_CONFIG])) if described else declared
    tensors = arrays_to_tensors(content[ARRAYS], str(conf.get(TRANSPORT, "float32")))
    modules, spec = factors_from_state_dict(tensors, settings, where=f"reply from node {node}", infer_ranks=not described)
    modules = {k: LoraFactors(A=f.A.float(), B=f.B.float(), scale=f.scale) for k, f in modules.items()}
    metrics = {k: float(v) for k, v in content[METRICS].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ParsedReply(ClientUpdate(client_id=str(node), num_examples=int(n), modules=modules), spec, metrics, tensor_bytes(tensors.values()))
