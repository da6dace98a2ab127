"""Hypothesis strategies: random federations of LoRA updates (non-square layers, mixed ranks)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from flexlora.update import ClientUpdate, LoraFactors


@st.composite
def federations(draw, max_clients: int = 5, max_dim: int = 20, max_rank: int = 8, same_rank: bool = False, shared_A: bool = False):
    """(updates, shapes): 1-5 clients, two modules with independent random shapes, per-module ranks."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "layers.0.q_proj": (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))),
        "layers.0.down_proj": (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))),
    }
    k = draw(st.integers(1, max_clients))
    common = {name: draw(st.integers(1, max_rank)) for name in shapes}
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0]))
    shared = {name: torch.randn(common[name], d_in, generator=g, dtype=torch.float64) for name, (_, d_in) in shapes.items()}
    updates = []
    for i in range(k):
        modules = {}
        for name, (d_out, d_in) in shapes.items():
            r = common[name] if (same_rank or shared_A) else draw(st.integers(1, max_rank))
            A = shared[name].clone() if shared_A else torch.randn(r, d_in, generator=g, dtype=torch.float64)
            B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
            a = alpha if (same_rank or shared_A) else draw(st.sampled_from([1.0, 8.0, 16.0]))
            modules[name] = LoraFactors(A=A, B=B, scale=a / r)
        updates.append(ClientUpdate(client_id=f"c{i}", num_examples=draw(st.integers(1, 500)), modules=modules))
    return updates, shapes
