"""Malformed inputs for robustness testing: mutated PEFT adapter directories and client updates.

Used by the hypothesis tests and by ``benchmarks/reliability.py``; every mutation must end in a
clear error (AdapterError / UpdateError, or a list of validation problems), never a crash,
a hang, or a write outside the output folder.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import torch

from flexlora.peft_io import CONFIG_NAME, WEIGHTS_NAME
from flexlora.update import ClientUpdate, LoraFactors

ADAPTER_MUTATIONS = (
    "truncate_weights",
    "flip_weight_bytes",
    "huge_header_length",
    "garbage_header",
    "config_not_json",
    "config_wrong_types",
    "huge_declared_rank",
    "rank_pattern_mismatch",
    "negative_alpha",
    "int_weights",
    "wrong_dims",
    "missing_B",
    "empty_weights",
    "extra_tensor",
    "nan_weights",
    "config_is_list",
)


def mutate_adapter(path: Path, mutation: str, rng: random.Random) -> None:
    """Apply one named mutation to an adapter directory in place."""
    from safetensors.torch import load_file, save_file

    w, c = path / WEIGHTS_NAME, path / CONFIG_NAME
    cfg = json.loads(c.read_text())
    if mutation == "truncate_weights":
        data = w.read_bytes()
        w.write_bytes(data[: rng.randrange(0, len(data))])
    elif mutation == "flip_weight_bytes":
        data = bytearray(w.read_bytes())
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        w.write_bytes(bytes(data))
    elif mutation == "huge_header_length":
        data = w.read_bytes()
        w.write_bytes(struct.pack("<Q", rng.choice([2**40, 2**63 - 1, len(data) * 4])) + data[8:])
    elif mutation == "garbage_header":
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        w.write_bytes(struct.pack("<Q", len(junk)) + junk)
    elif mutation == "config_not_json":
        c.write_text(c.read_text()[: rng.randrange(1, len(c.read_text()))] + "{{")
    elif mutation == "config_wrong_types":
        key = rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"])
        cfg[key] = rng.choice(["eight", [1, 2], {"a": "b"}, None, -3])
        c.write_text(json.dumps(cfg))
    elif mutation == "huge_declared_rank":
        cfg["r"] = rng.choice([10**9, 2**31, 10**18])
        c.write_text(json.dumps(cfg))
    elif mutation == "rank_pattern_mismatch":
        cfg["rank_pattern"] = {"q_proj": rng.randint(1, 64) + 100}
        c.write_text(json.dumps(cfg))
    elif mutation == "negative_alpha":
        cfg["lora_alpha"] = rng.choice([-16, 0, float("inf")]) if rng.random() < 0.5 else -1
        c.write_text(json.dumps(cfg))
    elif mutation in ("int_weights", "wrong_dims", "missing_B", "empty_weights", "extra_tensor", "nan_weights"):
        t = load_file(str(w))
        keys = sorted(t)
        k = rng.choice(keys)
        if mutation == "int_weights":
            t[k] = t[k].to(torch.int32)
        elif mutation == "wrong_dims":
            t[k] = t[k].reshape(-1)
        elif mutation == "missing_B":
            t = {x: v for x, v in t.items() if not (x.endswith("lora_B.weight") and x.split(".lora_B")[0] == k.split(".lora_")[0])}
        elif mutation == "empty_weights":
            t = {}
        elif mutation == "extra_tensor":
            t["base_model.model.lm_head.weight"] = torch.zeros(3, 3)
        else:
            t[k] = t[k].clone()
            t[k].view(-1)[0] = float("nan")
        if t:
            save_file(t, str(w))
        else:
            save_file({"__metadata_only__": torch.zeros(0)}, str(w))
    elif mutation == "config_is_list":
        c.write_text(json.dumps([cfg]))
    else:
        raise ValueError(f"unknown mutation {mutation!r}")


UPDATE_MUTATIONS = ("nan", "inf", "wrong_d_in", "wrong_d_out", "rank_mismatch_declared", "int_dtype", "huge_norm", "missing_module", "extra_module", "zero_examples")


def mutate_update(update: ClientUpdate, mutation: str, rng: random.Random) -> ClientUpdate:
    modules = dict(update.modules)
    name = rng.choice(sorted(modules))
    f = modules[name]
    n = update.num_examples
    if mutation == "nan":
        A = f.A.clone()
        A.view(-1)[rng.randrange(A.numel())] = float("nan")
        modules[name] = LoraFactors(A, f.B, f.scale)
    elif mutation == "inf":
        B = f.B.clone()
        B.view(-1)[rng.randrange(B.numel())] = float("inf")
        modules[name] = LoraFactors(f.A, B, f.scale)
    elif mutation == "wrong_d_in":
        modules[name] = LoraFactors(torch.randn(f.rank, f.d_in + rng.randint(1, 5)), f.B, f.scale)
    elif mutation == "wrong_d_out":
        modules[name] = LoraFactors(f.A, torch.randn(f.d_out + rng.randint(1, 5), f.rank), f.scale)
    elif mutation == "rank_mismatch_declared":
        r = f.rank + rng.randint(1, 4)
        modules[name] = LoraFactors(torch.randn(r, f.d_in), torch.randn(f.d_out, r), f.scale * f.rank / r)
    elif mutation == "int_dtype":
        modules[name] = LoraFactors(f.A.to(torch.int64), f.B.to(torch.int64), f.scale)
    elif mutation == "huge_norm":
        modules = {k: LoraFactors(g.A * 1e6, g.B * 1e6, g.scale) for k, g in modules.items()}
    elif mutation == "missing_module":
        modules.pop(name)
    elif mutation == "extra_module":
        modules[name + ".extra"] = f
    elif mutation == "zero_examples":
        n = rng.choice([0, -5])
    else:
        raise ValueError(f"unknown mutation {mutation!r}")
    return ClientUpdate(update.client_id, n, modules, dict(update.meta))
