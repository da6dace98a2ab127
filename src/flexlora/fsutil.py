"""The one way flexlora writes anything: to a temporary sibling, then renamed into place, so a
reader (or a resumed run) sees the old version or the complete new one, never a partial one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def atomic_write_bytes(path: Path, chunks: Iterable[bytes | memoryview], durable: bool = False) -> Path:
    """Write ``chunks`` to ``path`` atomically; ``durable`` also fsyncs the file and its folder
    (checkpoints: they must survive a power cut, not only a killed process)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)
    return path


def atomic_write_text(path: Path, text: str, durable: bool = False) -> Path:
    return atomic_write_bytes(path, [text.encode("utf-8")], durable)


def fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_directory(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` (or, with ``keep_existing``, is
    dropped when ``target`` appeared meanwhile: caches), on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if keep_existing:
                shutil.rmtree(tmp)
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
