"""Client resources -> per-module LoRA ranks.

The paper's four resource types give a rank for the attention projections and one for the MLP
(Type 1: 8/8, Type 2: 30/30, Type 3: 30/200, Type 4: 200/200), and five distributions assign
them to clients. Types are assigned once per client from the run seed, with exact proportions
(largest remainder) so that even a small federation follows its distribution.

Beyond the paper, ``budget`` mode gives each client a memory budget for its LoRA training
state and, every round, the largest rank that fits (budgets fluctuate round to round).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from flexlora.seeds import derived_seed
from flexlora.update import ModuleSpec

ATTENTION = "attention"
MLP = "mlp"
ALL_LINEAR = "all-linear"  # lora.targets: every linear layer but the output layer (PEFT's name for it)
# Layer names whose group is known across the families PEFT supports (Llama/Mistral/Qwen/Gemma,
# OPT, Falcon, GPT-NeoX, Phi, GPT-2, MPT). Names like GPT-2's c_proj or Falcon's dense sit in both
# kinds of block; their parent module decides (see :func:`module_group`).
DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    ATTENTION: ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "query", "key", "value"),
    MLP: ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "fc_in", "fc_out", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"),
}
_GROUP_PARENTS: dict[str, tuple[str, ...]] = {
    ATTENTION: ("attn", "attention", "self_attn", "self_attention"),
    MLP: ("mlp", "ffn", "feed_forward", "feedforward"),
}
PAPER_TYPES: dict[str, dict[str, int]] = {
    "type1": {ATTENTION: 8, MLP: 8},
    "type2": {ATTENTION: 30, MLP: 30},
    "type3": {ATTENTION: 30, MLP: 200},
    "type4": {ATTENTION: 200, MLP: 200},
}


def _discretised_gaussian(centre: float, sigma: float, n: int) -> list[float]:
    w = [math.exp(-0.5 * ((i + 1 - centre) / sigma) ** 2) for i in range(n)]
    return [x / sum(w) for x in w]


_NORMAL = _discretised_gaussian(2.5, 0.8, 4)  # ~ 0.11 / 0.39 / 0.39 / 0.11 over types 1-4
PAPER_DISTRIBUTIONS: dict[str, dict[str, float]] = {
    "homo": {"type1": 1.0},
    "uniform": {"type1": 0.25, "type2": 0.25, "type3": 0.25, "type4": 0.25},
    "heavy-tail-light": {"type1": 0.80, "type2": 0.05, "type3": 0.05, "type4": 0.10},
    "heavy-tail-strong": {"type1": 0.05, "type2": 0.05, "type3": 0.10, "type4": 0.80},
    "normal": {f"type{i + 1}": p for i, p in enumerate(_NORMAL)},
}


class ResourceError(ValueError):
    """A resource configuration problem (unknown type, rank larger than a layer, ...)."""


def module_group(name: str, groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """The group ('attention', 'mlp', ...) whose rank a module gets.

    ``groups`` (``lora.groups``) decides first: an entry matches a module whose name is it or ends
    in ``.entry`` (so ``"attn.c_proj"`` picks GPT-2's attention output, ``"c_proj"`` both), the
    longest matching entry wins. Otherwise the architecture decides: the nearest parent module
    named like an attention or MLP block (``self_attn``, ``attn``, ``mlp``, ...), else the layer's
    own name if it is a known one (``q_proj``, ``fc1``, ``query_key_value``, ...).
    """
    best: tuple[int, str] | None = None
    for group, entries in (groups or {}).items():
        for entry in entries:
            if (name == entry or name.endswith("." + entry)) and (best is None or len(entry) > best[0]):
                best = (len(entry), group)
    if best is not None:
        return best[1]
    parts = name.split(".")
    for parent in reversed(parts[:-1]):
        for group, parents in _GROUP_PARENTS.items():
            if parent in parents:
                return group
    for group, leaves in DEFAULT_GROUPS.items():
        if parts[-1] in leaves:
            return group
    raise ResourceError(
        f"module {name!r} is in no module group: neither its parent modules nor its name say whether it is attention or MLP; "
        f"set lora.groups, e.g. lora.groups = {{ {ATTENTION} = [...], {MLP} = [\"{parts[-1]}\"] }}"
    )


def group_members(names: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """{group: sorted distinct layer names (last name part, or ``parent.leaf`` where a leaf sits in two groups)}."""
    by_group: dict[str, set[str]] = {}
    leaf_groups: dict[str, set[str]] = {}
    for name in names:
        leaf_groups.setdefault(name.rsplit(".", 1)[-1], set()).add(module_group(name, groups))
    for name in names:
        parts = name.split(".")
        label = ".".join(parts[-2:]) if len(leaf_groups[parts[-1]]) > 1 and len(parts) > 1 else parts[-1]
        by_group.setdefault(module_group(name, groups), set()).add(label)
    return {g: sorted(v) for g, v in sorted(by_group.items())}


def assign_types(client_ids: Sequence[int], distribution: Mapping[str, float], seed: int) -> dict[int, str]:
    """Exact-proportion assignment of types to clients (largest remainder), shuffled with ``seed``."""
    if not distribution:
        raise ResourceError("empty resource distribution")
    total = sum(distribution.values())
    if total <= 0 or any(p < 0 for p in distribution.values()):
        raise ResourceError(f"distribution weights must be >= 0 and not all 0: {dict(distribution)}")
    n = len(client_ids)
    names = sorted(distribution)
    quotas = {t: n * distribution[t] / total for t in names}
    counts = {t: int(math.floor(q)) for t, q in quotas.items()}
    for t in sorted(names, key=lambda t: (-(quotas[t] - counts[t]), t))[: n - sum(counts.values())]:
        counts[t] += 1
    labels = [t for t in names for _ in range(counts[t])]
    random.Random(seed).shuffle(labels)
    return dict(zip(sorted(client_ids), labels))


@dataclass(frozen=True)
class RankPolicy:
    """How group ranks become module ranks on a concrete model."""

    alpha: float = 16.0
    rank_scale: float = 1.0  # multiply every rank (for narrow models); at least 1
    cap_at_width: bool = True  # cap r at min(d_out, d_in): a larger rank adds nothing
    rslora: bool = False  # scale alpha / sqrt(r) (rsLoRA) instead of alpha / r
    groups: Mapping[str, Sequence[str]] = field(default_factory=dict)  # lora.groups: explicit names; the architecture decides the rest

    def module_ranks(self, group_ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> tuple[dict[str, ModuleSpec], list[str]]:
        """Per-module specs for a client, and notes on every rank that was scaled or capped."""
        specs: dict[str, ModuleSpec] = {}
        notes: list[str] = []
        for name, (d_out, d_in) in shapes.items():
            group = module_group(name, self.groups)
            if group not in group_ranks:
                raise ResourceError(f"resource type has no rank for group {group!r} (module {name})")
            r = max(1, int(round(group_ranks[group] * self.rank_scale)))
            width = min(d_out, d_in)
            if r > width:
                if not self.cap_at_width:
                    raise ResourceError(f"rank {r} for module {name} exceeds its width {width} (d_out={d_out}, d_in={d_in}); lora.cap_at_width = true caps it at the width")
                notes.append(f"{name.rsplit('.', 1)[-1]}: rank {r} capped at width {width}")
                r = width
            specs[name] = ModuleSpec(rank=r, alpha=self.alpha, rslora=self.rslora)
        return specs, sorted(set(notes))


@dataclass(frozen=True)
class BudgetPolicy:
    """``budget`` mode: client k has a memory budget (MiB) for its LoRA training state; each round
    it is multiplied by a factor in [1 - fluctuation, 1 + fluctuation] and the client trains the
    largest uniform rank from ``ranks`` whose parameters, gradients and AdamW moments fit."""

    ranks: tuple[int, ...] = (4, 8, 16, 30, 64, 128, 200)
    fluctuation: float = 0.3
    bytes_per_param: int = 16  # fp32 weight + grad + two Adam moments

    def memory_mib(self, rank: int, shapes: Mapping[str, tuple[int, int]]) -> float:
        params = sum(rank * (d_out + d_in) for d_out, d_in in shapes.values())
        return params * self.bytes_per_param / 2**20

    def rank_for(self, budget_mib: float, shapes: Mapping[str, tuple[int, int]], client_id: int, round: int, seed: int) -> int:
        rng = random.Random(derived_seed(seed, client_id, round))
        available = budget_mib * (1 + rng.uniform(-self.fluctuation, self.fluctuation))
        fitting = [r for r in sorted(self.ranks) if self.memory_mib(r, shapes) <= available]
        return fitting[-1] if fitting else min(self.ranks)


def target_module_names(model, targets: Sequence[str] | str) -> dict[str, tuple[int, int]]:
    """{full module name: (d_out, d_in)} of the layers LoRA trains: ``"all-linear"`` (every linear
    layer but the output layer), or the linear / Conv1D layers whose name is or ends in ``.name``
    for a name in ``targets``."""
    from flexlora.models import adaptable_layers

    layers = adaptable_layers(model)
    if targets == ALL_LINEAR or list(targets) == [ALL_LINEAR]:
        if not layers:
            raise ResourceError("the model has no linear layers to adapt")
        return layers
    pattern = re.compile(rf"(^|\.)({'|'.join(map(re.escape, targets))})$")
    shapes = {name: shape for name, shape in layers.items() if pattern.search(name)}
    if not shapes:
        raise ResourceError(
            f"lora.targets {list(targets)} names no linear layer of this model; its layers are named {layer_leaves(layers)} "
            f"(or set lora.targets = \"{ALL_LINEAR}\")"
        )
    return shapes


def layer_leaves(names) -> list[str]:
    """The distinct last name parts of layer names, in model order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def unmatched_targets(model, targets: Sequence[str] | str) -> list[str]:
    """The names in ``lora.targets`` that match no layer of the model (they train nothing)."""
    if targets == ALL_LINEAR or list(targets) == [ALL_LINEAR]:
        return []
    from flexlora.models import adaptable_layers

    names = list(adaptable_layers(model))
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
