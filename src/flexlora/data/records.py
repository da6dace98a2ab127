"""Reading untrusted data files: gzip by content, JSON/JSONL with file:line errors, typed fields.

Shared by the Natural Instructions loader (:mod:`flexlora.data.ni`) and the instruction-record
loader (:mod:`flexlora.data.instruct`), so both report bad data the same way: ``on_error="raise"``
raises :class:`DataError` at the first problem, ``"skip"`` drops the bad unit and warns once per file.
"""

from __future__ import annotations

import gzip
import json
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from flexlora.data.types import DataError

OnError = Literal["raise", "skip"]

GZIP_MAGIC = b"\x1f\x8b"
MAX_LISTED_PROBLEMS = 10  # problems named in one warning; the rest are counted


class DataWarning(UserWarning):
    """Bad data was skipped because the caller asked for ``on_error="skip"``."""


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by flexlora.data.instruct)


class BadRecord(Exception):
    """A validation failure inside one unit; the caller turns it into a reported problem."""


class Problems:
    """Collects problems for one file: raises at the first in "raise" mode, warns once per file in "skip" mode."""

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self._by_file: dict[str, list[str]] = {}

    def report(self, file: Path | str, message: str) -> None:
        """Raise DataError(message) or remember it; ``message`` already names file and line/record."""
        if self.on_error == "raise":
            raise DataError(message)
        self._by_file.setdefault(str(file), []).append(message)

    def emit_warnings(self) -> None:
        for file, msgs in self._by_file.items():
            shown = "; ".join(msgs[:MAX_LISTED_PROBLEMS])
            more = f"; ... and {len(msgs) - MAX_LISTED_PROBLEMS} more" if len(msgs) > MAX_LISTED_PROBLEMS else ""
            warnings.warn(f"{file}: skipped {len(msgs)} bad item(s): {shown}{more}", DataWarning, stacklevel=3)
        self._by_file.clear()


def open_binary(path: Path) -> IO[bytes]:
    """Open plain or gzip data by content (magic bytes), not by file name."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def iter_jsonl(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line; bad lines and damaged gzip are reported."""
    require_file(path)
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    problems.report(path, f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                except json.JSONDecodeError as e:
                    problems.report(path, f"{path}:{lineno}:{e.colno}: invalid JSON: {e.msg}")
                    continue
                yield lineno, obj
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        problems.report(
            path, f"{path}:{lineno + 1}: unreadable, truncated or corrupt data ({type(e).__name__}: {e}); {lineno} line(s) were read"
        )


def load_json(path: Path, problems: Problems) -> tuple[bool, Any]:
    """(ok, parsed JSON) of a whole file; ok is False when the problem was skipped."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        problems.report(path, f"{path}: unreadable or corrupt file ({type(e).__name__}: {e})")
        return False, None
    try:
        return True, json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        problems.report(path, f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        problems.report(path, f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}")
    return False, None


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def get_str(obj: dict[str, Any], key: str, *, nonempty: bool = False) -> str:
    """A required string field (raises BadRecord naming the field)."""
    if key not in obj:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type_name(value)}")
    if nonempty and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def get_int(obj: dict[str, Any], key: str) -> int:
    if key not in obj:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"field {key!r} must be an integer, got {type_name(value)}")
    if value < 0:
        raise BadRecord(f"field {key!r} must be >= 0, got {value}")
    return value
