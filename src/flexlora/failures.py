"""Failure injection (``[failures]``): clients that crash, straggle past the timeout, or send
garbage (NaN, a wrong shape, an absurd norm), drawn per round and client from the run seed. The
simulator injects them; on Flower each node injects its own (:func:`flexlora.flower.node.handle_train`)."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from flexlora.seeds import derived_seed
from flexlora.update import ClientUpdate, LoraFactors


def client_failure(seed: int, f, rnd: int, client_id: int | str) -> tuple[str | None, random.Random]:
    """The failure injected into one client's round and the generator that shapes it, seeded by
    (run seed, round, client): the simulator and a Flower node of that client draw the same."""
    rng = random.Random(derived_seed(seed, "failures", rnd, client_id))
    return draw_failure(rng, f), rng


def draw_failure(rng: random.Random, f) -> str | None:
    x = rng.random()
    if x < f.crash:
        return "crash"
    if x < f.crash + f.garbage:
        return "garbage"
    if x < f.crash + f.garbage + f.straggle:
        return "straggle"
    return None


GARBAGE = ("nan", "shape", "norm")


def garbage_kind(names, rng: random.Random) -> tuple[str, str]:
    """Which garbage and in which module (the same draws for LoRA factors and for dense updates)."""
    kind = rng.choice(list(GARBAGE))
    ordered = sorted(names)
    return kind, ordered[rng.randrange(len(ordered))]


def garbage_update(update: ClientUpdate, rng: random.Random) -> ClientUpdate:
    """A hostile or broken client: NaN, a wrong shape, or an absurd norm."""
    modules = dict(update.modules)
    kind, name = garbage_kind(modules, rng)
    f = modules[name]
    if kind == "nan":
        A = f.A.clone()
        A[0, 0] = float("nan")
        modules[name] = LoraFactors(A, f.B, f.scale)
    elif kind == "shape":
        modules[name] = LoraFactors(torch.zeros(f.rank, f.d_in + 1), f.B, f.scale)
    else:
        modules = {n: LoraFactors(g.A * 1e4, g.B * 1e4, g.scale) for n, g in modules.items()}
    return ClientUpdate(update.client_id, update.num_examples, modules, {**update.meta, "garbage": kind})


def garbage_deltas(deltas: dict[str, Tensor], rng: random.Random) -> dict[str, Tensor]:
    """:func:`garbage_update` for dense full-weight updates (SLoRA's stage 1): the same kinds, the
    absurd norm as large as the factors' (each factor x 1e4)."""
    out = dict(deltas)
    kind, name = garbage_kind(out, rng)
    if kind == "nan":
        out[name] = out[name].clone()
        out[name][0, 0] = float("nan")
    elif kind == "shape":
        d_out, d_in = out[name].shape
        out[name] = torch.zeros(d_out, d_in + 1)
    else:
        out = {n: d * 1e8 for n, d in out.items()}
    return out
