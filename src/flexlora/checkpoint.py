"""Atomic, verified checkpoints: a run killed at any point resumes from the last finished round.

A checkpoint file is a SHA-256 digest line followed by ``torch.save`` bytes. It is written to a
temporary file, fsynced and renamed into place; the previous one is kept as ``.prev`` so that a
corrupted or truncated latest checkpoint falls back to the one before, with a clear message.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from flexlora.fsutil import atomic_write_bytes, fsync_folder
from flexlora.update import GlobalModule, ServerState

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint (every candidate missing or corrupted)."""


def state_to_dict(state: ServerState) -> dict[str, Any]:
    def modules(ms: dict[str, GlobalModule] | None):
        if ms is None:
            return None
        return {n: {"A": m.A, "B": m.B, "spectrum": m.spectrum} for n, m in ms.items()}

    return {
        "method": state.method,
        "round": state.round,
        "adapter": modules(state.adapter),
        "base_delta": modules(state.base_delta),
        "weights": dict(state.weights),
        "info": state.info,
    }


def state_from_dict(d: dict[str, Any]) -> ServerState:
    def modules(ms):
        if ms is None:
            return None
        return {n: GlobalModule(A=m["A"], B=m["B"], spectrum=m["spectrum"]) for n, m in ms.items()}

    return ServerState(
        method=d["method"], round=d["round"], adapter=modules(d["adapter"]), base_delta=modules(d["base_delta"]), weights=d["weights"], info=d["info"]
    )


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()  # a view: no second copy of a checkpoint that can be hundreds of MB
    digest = hashlib.sha256(data).hexdigest().encode() + b"\n"
    latest = folder / LATEST
    staged = atomic_write_bytes(folder / f".{LATEST}.staged", [digest, data], durable=True)
    if latest.exists():
        os.replace(latest, folder / PREVIOUS)
    os.replace(staged, latest)
    fsync_folder(folder)
    return latest


def _read(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    head, sep, data = raw.partition(b"\n")
    if not sep or len(head) != 64:
        raise CheckpointError(f"{path}: not a flexlora checkpoint (missing digest line)")
    if hashlib.sha256(data).hexdigest().encode() != head:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted file)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest good checkpoint, None when there is none, CheckpointError when all are corrupted."""
    candidates = [folder / LATEST, folder / PREVIOUS]
    existing = [p for p in candidates if p.exists()]
    if not existing:
        return None
    errors = []
    for path in existing:
        try:
            payload = _read(path)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
            continue
        if errors:
            warnings.warn(f"resuming from {path.name} (round {payload.get('round')}) because {errors[0]}", stacklevel=2)
        payload["_source"] = path.name
        return payload
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
