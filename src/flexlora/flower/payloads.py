"""What the node and the server share: names, the run config's defaults, the lazy flwr import,
and the payload encoding (factors <-> ArrayRecord, specs <-> ConfigRecord, the run config as JSON)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from flexlora.update import LoraFactors, ModuleSpec, UpdateError

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from flexlora.config import RunConfig

LOG = logging.getLogger("flwr.flexlora")  # a child of Flower's logger: shows in `flwr log` / `--stream`

QUERY = "query"
TRAIN = "train"
SUMMARY = "summary.json"

# The run config of the Flower App (`[tool.flwr.app.config]`), with its defaults.
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "",  # flexlora TOML config ("" = built-in defaults); absolute, or relative to the ServerApp's cwd
    "set": "",  # overrides, "federation.rounds=4; train.lr=1e-4"
    "aggregation": "",  # method override: any flexlora method (flexlora, fedavg, hetlora, flora, ffa, rank_partition, florist, fedex, lora_fair, rolora)
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


def flwr_app():
    """``flwr.app`` (Message, RecordDict, ArrayRecord ...), imported when first needed, so the rest of
    flexlora imports without Flower; a missing install is one line naming the extra to add."""
    try:
        import flwr.app as app
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Flower layer needs flwr: pip install 'flexlora[flower]'") from e
    return app


# -- payload encoding ----------------------------------------------------------------------------
# Factors travel in one of these dtypes. NumPy (and so Flower's Array) has no bfloat16: its 16 bits
# travel as int16, and the message's "transport-dtype" tells the receiver to view them back.
TRANSPORT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def transport_dtype(name: str) -> torch.dtype:
    try:
        return TRANSPORT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown transport dtype {name!r}; choose one of {sorted(TRANSPORT_DTYPES)}") from None


def tensors_to_arrays(tensors: Mapping[str, Tensor], transport: str = "float32") -> "ArrayRecord":
    """Tensors (CPU, any float dtype) as an ArrayRecord in the ``transport`` dtype (see TRANSPORT_DTYPES)."""
    app = flwr_app()
    dtype = transport_dtype(transport)
    arrays = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu", dtype).contiguous()
        arrays[key] = app.Array((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy())
    return app.ArrayRecord(arrays)


def factors_to_arrays(factors: Mapping[str, LoraFactors], dtype: torch.dtype = torch.float32) -> "ArrayRecord":
    """``{name}.A`` / ``{name}.B`` arrays (C-order, ``dtype``) in an ArrayRecord."""
    app = flwr_app()
    arrays = {}
    for name, f in factors.items():
        arrays[f"{name}.A"] = app.Array(f.A.detach().to(dtype).contiguous().numpy())
        arrays[f"{name}.B"] = app.Array(f.B.detach().to(dtype).contiguous().numpy())
    return app.ArrayRecord(arrays)


def arrays_to_tensors(record: "ArrayRecord", transport: str = "float32") -> dict[str, Tensor]:
    """Tensors back from an ArrayRecord; ``transport`` = "bfloat16" views int16 arrays as bfloat16."""
    bf16 = transport_dtype(transport) == torch.bfloat16
    out = {}
    for key, arr in record.items():
        t = torch.from_numpy(arr.numpy().copy())
        out[key] = t.view(torch.bfloat16) if bf16 and t.dtype == torch.int16 else t
    return out


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
    app = flwr_app()
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
