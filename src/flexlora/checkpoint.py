"""Atomic, verified checkpoints: a run killed at any point resumes from the last finished round.

A checkpoint file is a SHA-256 digest line followed by ``torch.save`` bytes. It is written to a
temporary file, fsynced and renamed into place; the previous one is kept as ``.prev`` so that a
corrupted or truncated latest checkpoint falls back to the one before, with a clear message.

A run hands its checkpoint to a :class:`CheckpointWriter`, which builds, serialises, hashes, writes
and fsyncs it on a thread while the next round trains; the round's metrics line follows once the
file is in place, as before.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

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


def serialise(payload: dict[str, Any]) -> memoryview:
    """The checkpoint's bytes (``torch.save``), a snapshot: later changes to the payload's tensors
    or dicts do not reach them."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getbuffer()  # a view: no second copy of a checkpoint that can be hundreds of MB


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    return write_checkpoint(folder, serialise(payload))


def write_checkpoint(folder: Path, data: memoryview | bytes) -> Path:
    """Digest line + ``data`` to ``checkpoint.pt`` (the old one kept as ``checkpoint.prev.pt``), durably."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest().encode() + b"\n"
    latest = folder / LATEST
    staged = atomic_write_bytes(folder / f".{LATEST}.staged", [digest, data], durable=True)
    if latest.exists():
        os.replace(latest, folder / PREVIOUS)
    os.replace(staged, latest)
    fsync_folder(folder)
    return latest


class CheckpointWriter:
    """Writes one checkpoint at a time on a background thread.

    ``start(make)`` waits for the previous write and returns at once; on the writer thread ``make()``
    builds the payload, which is serialised, hashed, written, fsynced and renamed into place while
    the next round trains. ``make`` may read only what nobody changes afterwards: the caller copies
    its mutable containers before ``start`` (a run's server state is never changed in place: every
    round makes a new one).
    ``then`` runs on the writer thread once the file is in place (the run appends its metrics line
    there, so a metrics line never announces a round whose checkpoint did not land). ``wait``
    blocks until the write is done and raises its error. A process killed mid-write leaves the
    previous checkpoint, as a synchronous write would.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_seconds = 0.0  # how long the last background write took (serialising included)

    def start(self, make: Callable[[], dict[str, Any]], then: Callable[[], None] | None = None) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(make, then), name="flexlora-checkpoint", daemon=False)
        self._thread.start()

    def _write(self, make: Callable[[], dict[str, Any]], then: Callable[[], None] | None) -> None:
        started = time.perf_counter()
        try:
            write_checkpoint(self.folder, serialise(make()))
            self.last_write_seconds = time.perf_counter() - started
            if then is not None:
                then()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by wait()
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


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
