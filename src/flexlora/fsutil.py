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
            replace_folder(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target`` (a folder) and delete the old one, so that a process killed
    at any moment leaves ``target`` whole: old or new, never half-deleted (deleting the old folder
    first, as this once did, left a partial one when killed meanwhile)."""
    if target.is_symlink():  # the user's link stays; the folder it names is replaced
        target = target.resolve()
    if _exchange(new, target):  # one atomic step: ``new`` now holds the old folder
        shutil.rmtree(new, ignore_errors=True)
        return
    old = new.with_name(new.name + ".old")  # no exchange here: two renames; in between both are whole on disk
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


MARKER = ".flexlora-output"  # in every folder flexlora writes: --overwrite replaces only folders that hold it


class OutputFolderError(ValueError):
    """An output folder that would put the user's files at risk; the message says which and why."""


def check_output_folder(out: Path, inputs: Iterable[Path | str] = (), overwrite: bool = False, resume: bool = False) -> None:
    """Refuse, before any work, an output folder that is, contains or lies inside an input, that is
    (or contains) the working directory, or that already holds something: unless ``resume`` (the
    caller resumes the flexlora run there) or ``overwrite`` of a folder flexlora itself wrote (it holds
    :data:`MARKER`; the caller replaces it only once the new result is complete)."""
    target = Path(out).resolve()  # through symlinks: a link to an input is that input
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputFolderError(f"{out}: is {'the working directory' if target == cwd else 'a parent of the working directory'}; write into a new folder")
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            raise OutputFolderError(f"{out}: is the input {given}; write into a new folder")
        if target in source.parents:
            raise OutputFolderError(f"{out}: contains the input {given}; write into a new folder")
        if source in target.parents:
            raise OutputFolderError(f"{out}: lies inside the input {given}; write into a new folder")
    if target.exists() and not target.is_dir():
        raise OutputFolderError(f"{out}: is a file, not a folder")
    if not (target.is_dir() and any(target.iterdir())):
        return
    if resume:  # a run continues only its own folder: never fills (or rewrites files in) a folder of the user's
        kind = output_kind(target)
        if kind != "run":
            what = f"holds a flexlora {kind} output, not a run" if kind else f"was not written by flexlora (it holds no {MARKER})"
            raise OutputFolderError(f"{out}: --resume continues only a run flexlora wrote; this folder {what}, so nothing was touched")
        return
    if not overwrite:
        raise OutputFolderError(f"{out}: output folder exists and is not empty (choose a new folder, --resume a run there, or --overwrite a flexlora output)")
    if not (target / MARKER).is_file():
        raise OutputFolderError(f"{out}: --overwrite replaces only a folder flexlora wrote (it holds {MARKER}); this one does not, so nothing was touched")


def mark_output(folder: Path, kind: str) -> None:
    """Sign a folder as flexlora's output (what ``--overwrite`` may replace)."""
    atomic_write_text(Path(folder) / MARKER, f'{{"written_by": "flexlora", "kind": "{kind}"}}\n')


def output_kind(folder: Path) -> str | None:
    """What flexlora wrote ``folder`` as ("run", "aggregate"), None when it holds no readable marker."""
    import json

    try:
        return str(json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("kind")) or None
    except (OSError, ValueError, AttributeError):
        return None
