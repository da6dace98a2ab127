"""SLoRA's warm-up stage (Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of
Language Models", 2023): the first ``federation.slora_rounds`` rounds train sparse full-weight updates
(a fixed random mask per client whose density matches its LoRA's parameter count), FedAvg them into
the base weights, and at the end of the stage the accumulated update becomes the LoRA
initialisation through its SVD, so every client's share is its best rank-r approximation.

A mix-in of :class:`flexlora.simulate.Simulation` (it uses the simulation's model, engine and
sampling); ``federation.algorithm = "slora"`` switches it on, with any aggregation method that
does not restart LoRA every round.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import torch
from torch import Tensor

from flexlora.data.types import ClientData
from flexlora.failures import draw_failure
from flexlora.rounds import ClientStatus, mean, rank_summary
from flexlora.seeds import derived_seed
from flexlora.train import ClientOutOfMemory, sparse_mask, train_client_sparse
from flexlora.update import GlobalModule, ModuleSpec, ServerState


class SparseWarmup:
    def is_sparse_round(self, rnd: int) -> bool:
        return self.cfg.federation.algorithm == "slora" and rnd <= self.cfg.federation.slora_rounds

    def sparse_masks(self, client: ClientData, spec: dict[str, ModuleSpec]) -> dict[str, Tensor]:
        """SLoRA stage 1: a fixed random mask per client and module, with as many entries as the
        client's LoRA at that module has parameters (its resource type sets the density)."""
        masks = {}
        for name, (d_out, d_in) in self.fed.shapes.items():
            density = min(1.0, spec[name].rank * (d_in + d_out) / (d_in * d_out))
            masks[name] = sparse_mask((d_out, d_in), density, derived_seed(self.cfg.federation.seed, "mask", client.client_id, name))
        return masks

    def run_sparse_round(self, rnd: int, bar=None) -> dict[str, Any]:
        """FedAvg of the clients' sparse full-weight updates, merged into the base weights."""
        cfg = self.cfg
        t0 = time.perf_counter()
        train_cfg = dataclasses.replace(cfg.train, lr=cfg.federation.slora_lr)
        fail_rng = random.Random(derived_seed(cfg.federation.seed, "failures", rnd))
        acc = {n: torch.zeros(s, dtype=self.server_dtype) for n, s in self.fed.shapes.items()}
        total_n, clients_log, dropped, bytes_up = 0, [], {}, 0
        nnz_global = sum(int((d != 0).sum()) for d in self.merged.values())
        selected = self.sample(rnd)
        for client in selected:
            cid = str(client.client_id)
            spec = self.spec_for(client, rnd)
            entry: dict[str, Any] = {"id": client.client_id, "type": self.fed.types.get(client.client_id), "n": client.num_examples, "ranks": rank_summary(spec)}
            failure = draw_failure(fail_rng, cfg.failures)
            if failure in ("crash", "straggle"):
                dropped[cid] = ["crashed during local training" if failure == "crash" else "missed the round timeout"]
                clients_log.append({**entry, "status": ClientStatus(failure)})
                continue
            masks = self.sparse_masks(client, spec)
            try:
                res = train_client_sparse(self.model, self.tokenizer, client, masks, train_cfg, derived_seed(cfg.federation.seed, "train", rnd, client.client_id))
            except ClientOutOfMemory as e:  # that client's failure: weights restored, memory released
                dropped[cid] = [str(e)]
                clients_log.append({**entry, "status": ClientStatus.OOM})
                continue
            if failure == "garbage":
                res.deltas[sorted(res.deltas)[0]][0, 0] = float("nan")
            if not all(bool(torch.isfinite(d).all()) for d in res.deltas.values()):
                dropped[cid] = ["sparse update contains NaN or Inf"]
                clients_log.append({**entry, "status": ClientStatus.REJECTED})
                continue
            for name, d in res.deltas.items():
                acc[name] += client.num_examples * d.to(self.server_dtype)
            total_n += client.num_examples
            bytes_up += res.nnz * 8  # value + int32 index
            clients_log.append({**entry, "status": ClientStatus.OK, "density": res.nnz / sum(m.numel() for m in masks.values()), **{k: v for k, v in res.metrics.items()}})
        rec: dict[str, Any] = {"round": rnd, "stage": "slora-sparse", "clients": clients_log, "dropped": dropped, "bytes_up": bytes_up, "bytes_down": nnz_global * 8 * len(selected)}
        ok = [e for e in clients_log if e.get("status") == ClientStatus.OK]
        if len(ok) < max(1, cfg.federation.min_clients):
            rec["skipped"] = f"only {len(ok)} valid updates, fewer than min_clients={cfg.federation.min_clients}; global state unchanged"
            return rec
        for name, a in acc.items():
            d = a / total_n
            self.merged[name] = self.merged[name] + d if name in self.merged else d
        self._set_base_weights()
        rec["train_loss"] = mean([e["loss_mean"] for e in ok])
        rec["tokens"] = sum(e["tokens"] for e in ok)
        rec["timings"] = {"train": time.perf_counter() - t0}
        return rec

    def slora_transition(self, rnd: int) -> ServerState:
        """End of stage 1: the base weights go back to the original ones and the accumulated sparse
        update becomes the LoRA initialisation, SVD-ordered so every client's share is its best
        rank-r approximation (whatever aggregation stage 2 uses)."""
        adapter = {}
        for name, delta in self.merged.items():
            U, S, Vh = torch.linalg.svd(delta.to(self.server_dtype), full_matrices=False)
            adapter[name] = GlobalModule(A=Vh.contiguous(), B=(U * S).contiguous(), spectrum=S)
        self.stage1_delta = self.merged
        self.merged = {}
        self._set_base_weights()
        return ServerState(method=self.method.name, round=rnd, adapter=adapter, info={"seed": self.cfg.federation.seed, "slora_init": True})
