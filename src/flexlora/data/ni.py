"""Natural Instructions loader for FlexLoRA's one-task-per-client split (1614 SNI tasks).

Two on-disk layouts hold the same clients:

* **compact** (``../shared/data/flexlora-ni``, see its README): a gzip JSONL file, one client per
  line (``clients.jsonl.gz`` or ``tiny.jsonl.gz``), or a directory containing ``clients.jsonl.gz`` and
  optionally ``heldout_clients.json``. The task definition is stored once per client (``definition``).
* **official** (FederatedScope ``FlexLoRA`` branch, ``data/1613/``): a directory of
  ``local_training_{i}.json``, ``local_eval_{i}.json``, ``local_test_{i}.json``, each a JSON list of
  ``{instruction, input, output, category}`` with ``category`` like ``"Question Generation 0.json"``.

Both give the same :class:`ClientData` (the compact file's records are the official files' records
after the same length filter and caps), so experiments do not depend on which copy is at hand.

Held-out clients (the unseen tasks of zero-shot evaluation) come, in this order of precedence, from
an explicit ``heldout_ids`` / ``heldout_file``, else the directory's ``heldout_clients.json``, else the
compact records' own ``heldout`` field. Use :func:`split_heldout` to get the training list: it is
the one place that decides, so a held-out client can never reach federated training.

Errors: bad data raises :class:`DataError` whose message starts ``file:line:`` (JSONL) or
``file: record N:`` (JSON lists, N 0-based). With ``on_error="skip"`` the bad unit is dropped
instead and ONE :class:`DataWarning` per file lists what was dropped (the smallest unit that keeps
the rest valid: a record inside a client, a whole client for a broken line or unreadable file; a
truncated gzip keeps the lines read before the damage). A broken held-out list always raises:
skipping it would silently move unseen tasks into training.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from flexlora.data.records import (
    BadRecord,
    DataWarning,
    OnError,
    Problems,
    get_int,
    get_str,
    iter_jsonl,
    load_json,
    require_file,
    type_name,
)
from flexlora.data.types import ClientData, DataError, Example

Layout = Literal["auto", "compact", "official"]

COMPACT_FILE = "clients.jsonl.gz"
HELDOUT_FILE = "heldout_clients.json"
FLAG_TRAIN_FILE_MISSING = "train_file_missing_in_snapshot"
FLAG_N_TRAIN_INFERRED = "n_train_full_inferred"
FLAG_EVAL_FILE_MISSING = "eval_file_missing"
FLAG_TEST_FILE_MISSING = "test_file_missing"

_OFFICIAL_NAME = re.compile(r"^local_(training|eval|test)_(\d+)\.json$")
_CATEGORY_SUFFIX = re.compile(r" \d+\.json$")


def _check_positive(name: str, value: int | None, minimum: int = 0) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def _keep(examples: Iterable[Example], max_chars: int | None, cap: int | None) -> list[Example]:
    """The README's selection rule: drop len(input)+len(output) > max_chars, then keep the first ``cap``."""
    out: list[Example] = []
    for ex in examples:
        if cap is not None and len(out) >= cap:
            break
        if max_chars is None or len(ex.input) + len(ex.output) <= max_chars:
            out.append(ex)
    return out


def strip_category_suffix(raw: str) -> str:
    """``"Question Generation 0.json"`` -> ``"Question Generation"`` (SNI task-file suffix removed)."""
    return _CATEGORY_SUFFIX.sub("", raw)


# ----------------------------------------------------------------------------------------------
# Held-out lists


def read_heldout_file(path: str | os.PathLike[str]) -> set[int]:
    """Client ids from a ``heldout_clients.json`` (``{"client_ids": [...], ...}``) or a bare JSON list of ids.

    Always raises on bad content (never skips): a damaged list would leak unseen tasks into training.
    """
    p = Path(path)
    require_file(p)
    _, data = load_json(p, Problems("raise"))
    ids = data.get("client_ids") if isinstance(data, dict) else data
    if isinstance(data, dict) and "client_ids" not in data:
        raise DataError(f"{p}: held-out file has no 'client_ids' key (keys: {sorted(data)[:8]})")
    if not isinstance(ids, list):
        raise DataError(f"{p}: held-out ids must be a JSON list of integers, got {type_name(ids)}")
    out: set[int] = set()
    for i, cid in enumerate(ids):
        if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
            raise DataError(f"{p}: client_ids[{i}]: must be a non-negative integer, got {cid!r}")
        out.add(cid)
    return out


def _explicit_heldout(heldout_file: str | os.PathLike[str] | None, heldout_ids: Iterable[int] | None) -> set[int] | None:
    if heldout_file is not None and heldout_ids is not None:
        raise ValueError("give heldout_file or heldout_ids, not both")
    if heldout_file is not None:
        return read_heldout_file(heldout_file)
    if heldout_ids is not None:
        ids = set()
        for cid in heldout_ids:
            if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
                raise ValueError(f"heldout_ids must be non-negative integers, got {cid!r}")
            ids.add(cid)
        return ids
    return None


# ----------------------------------------------------------------------------------------------
# Layout detection


def detect_layout(path: str | os.PathLike[str]) -> Literal["compact", "official"]:
    """``compact`` for a (gzip) JSONL file or a directory with ``clients.jsonl.gz``; ``official`` for a
    directory of ``local_{training,eval,test}_{i}.json`` files."""
    p = Path(path)
    if p.is_file():
        return "compact"
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    has_compact = (p / COMPACT_FILE).is_file()
    has_official = any(_OFFICIAL_NAME.match(child.name) for child in p.iterdir())
    if has_compact and has_official:
        raise DataError(f"{p}: holds both {COMPACT_FILE} and local_*_i.json files; pass layout='compact' or 'official'")
    if has_compact:
        return "compact"
    if has_official:
        return "official"
    raise DataError(f"{p}: neither {COMPACT_FILE} nor local_training_i.json / local_eval_i.json files found")


# ----------------------------------------------------------------------------------------------
# Compact layout


def _compact_records(items: Any, split: str, where: str, definition: str, problems: Problems, file: Path) -> list[Example]:
    """Examples of one split of a compact line; a bad record is reported (and skipped in skip mode)."""
    if not isinstance(items, list):
        raise BadRecord(f"field {split!r} must be a list, got {type_name(items)}")
    out: list[Example] = []
    for j, rec in enumerate(items):
        try:
            if not isinstance(rec, dict):
                raise BadRecord(f"must be an object, got {type_name(rec)}")
            out.append(Example(definition, get_str(rec, "input"), get_str(rec, "output")))
        except BadRecord as e:
            problems.report(file, f"{where}: {split}[{j}]: {e}")
    return out


def _parse_compact_line(
    obj: Any,
    where: str,
    file: Path,
    problems: Problems,
    max_train: int | None,
    max_eval: int | None,
    max_chars: int | None,
) -> ClientData:
    """One client from one compact JSONL object (raises BadRecord for client-level problems)."""
    if not isinstance(obj, dict):
        raise BadRecord(f"a line must be a JSON object, got {type_name(obj)}")
    cid = get_int(obj, "client_id")
    where = f"{where}: client {cid}"
    try:
        category = get_str(obj, "category", nonempty=True)
        definition = get_str(obj, "definition", nonempty=True)
        n_train_full = get_int(obj, "n_train_full")
        heldout = obj.get("heldout", False)
        if not isinstance(heldout, bool):
            raise BadRecord(f"field 'heldout' must be true/false, got {type_name(heldout)}")
        flags = obj.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise BadRecord("field 'flags' must be a list of strings")
        for key in ("train", "eval"):
            if key not in obj:
                raise BadRecord(f"missing field {key!r}")
        train = _compact_records(obj["train"], "train", where, definition, problems, file)
        evals = _compact_records(obj["eval"], "eval", where, definition, problems, file)
        test = _compact_records(obj.get("test", []), "test", where, definition, problems, file)
    except BadRecord as e:
        raise BadRecord(f"client {cid}: {e}") from None
    if n_train_full < len(obj["train"]):
        raise BadRecord(f"client {cid}: n_train_full ({n_train_full}) is smaller than its {len(obj['train'])} train records")
    if not train and not evals and not test and n_train_full == 0:
        raise BadRecord(f"client {cid}: empty client (no train, eval or test records and n_train_full = 0)")
    return ClientData(
        client_id=cid,
        category=category,
        train=_keep(train, max_chars, max_train),
        eval=_keep(evals, max_chars, max_eval),
        test=_keep(test, max_chars, max_eval),
        num_train_full=n_train_full,
        heldout=heldout,
        flags=sorted(flags),
    )


def _load_compact(
    file: Path,
    problems: Problems,
    wanted: set[int] | None,
    max_train: int | None,
    max_eval: int | None,
    max_chars: int | None,
) -> list[ClientData]:
    clients: dict[int, ClientData] = {}
    first_line: dict[int, int] = {}
    for lineno, obj in iter_jsonl(file, problems):
        where = f"{file}:{lineno}"
        if wanted is not None and isinstance(obj, dict) and isinstance(obj.get("client_id"), int) and obj["client_id"] not in wanted:
            continue  # not asked for: not validated further either (keeps partial loads fast)
        try:
            client = _parse_compact_line(obj, where, file, problems, max_train, max_eval, max_chars)
        except BadRecord as e:
            problems.report(file, f"{where}: {e}")
            continue
        if client.client_id in clients:
            problems.report(file, f"{where}: duplicate client_id {client.client_id} (first on line {first_line[client.client_id]})")
            continue
        clients[client.client_id] = client
        first_line[client.client_id] = lineno
    return list(clients.values())


# ----------------------------------------------------------------------------------------------
# Official layout


def infer_train_size(n_eval_full: int, n_test_full: int) -> int | None:
    """The largest training size consistent with the source split rule (train = floor(0.8 N),
    eval = floor(0.1 N), test = rest), or None if no N fits.

    Used when a client's training file is absent (client 967 of the snapshot); for eval/test sizes
    64/66 it gives 519, the value the compact file records.
    """
    best = None
    for n in range(10 * n_eval_full, 10 * n_eval_full + 10):  # exactly the N with floor(0.1 N) == n_eval_full
        n_train = (8 * n) // 10
        if n - n_train - n // 10 == n_test_full:
            best = n_train if best is None else max(best, n_train)
    return best


def _official_file(path: Path, problems: Problems, category: list[str | None]) -> list[Example] | None:
    """Examples of one local_*_i.json file; None if the file is unusable (skipped).

    ``category`` is a one-item cell shared by a client's files: the first record sets it, and a
    record whose category differs is a bad record (a client is one task).
    """
    ok, data = load_json(path, problems)
    if not ok:
        return None
    if not isinstance(data, list):
        problems.report(path, f"{path}: must hold a JSON list of records, got {type_name(data)}")
        return None
    out: list[Example] = []
    for i, rec in enumerate(data):
        try:
            if not isinstance(rec, dict):
                raise BadRecord(f"must be an object, got {type_name(rec)}")
            instruction = get_str(rec, "instruction", nonempty=True)
            inp = get_str(rec, "input")
            outp = get_str(rec, "output")
            cat = strip_category_suffix(get_str(rec, "category", nonempty=True))
            if category[0] is None:
                category[0] = cat
            elif cat != category[0]:
                raise BadRecord(f"category {cat!r} differs from the client's category {category[0]!r}")
        except BadRecord as e:
            problems.report(path, f"{path}: record {i}: {e}")
            continue
        out.append(Example(instruction, inp, outp))
    return out


def _official_ids(directory: Path) -> dict[int, dict[str, Path]]:
    files: dict[int, dict[str, Path]] = {}
    for child in directory.iterdir():
        m = _OFFICIAL_NAME.match(child.name)
        if m and child.is_file():
            files.setdefault(int(m.group(2)), {})[m.group(1)] = child
    return files


def _load_official(
    directory: Path,
    problems: Problems,
    wanted: set[int] | None,
    max_train: int | None,
    max_eval: int | None,
    max_chars: int | None,
) -> list[ClientData]:
    clients: list[ClientData] = []
    for cid, files in sorted(_official_ids(directory).items()):
        if wanted is not None and cid not in wanted:
            continue
        category: list[str | None] = [None]
        splits: dict[str, list[Example]] = {}
        flags: list[str] = []
        usable = True
        for split, flag in (("training", FLAG_TRAIN_FILE_MISSING), ("eval", FLAG_EVAL_FILE_MISSING), ("test", FLAG_TEST_FILE_MISSING)):
            if split not in files:
                flags.append(flag)
                splits[split] = []
                continue
            examples = _official_file(files[split], problems, category)
            if examples is None:  # unreadable file, skipped: drop the whole client
                usable = False
                break
            splits[split] = examples
        if not usable:
            continue
        n_train_full = len(splits["training"])
        if FLAG_TRAIN_FILE_MISSING in flags and FLAG_EVAL_FILE_MISSING not in flags and FLAG_TEST_FILE_MISSING not in flags:
            inferred = infer_train_size(len(splits["eval"]), len(splits["test"]))
            if inferred is not None:
                n_train_full = inferred
                flags.append(FLAG_N_TRAIN_INFERRED)
        if category[0] is None:
            names = ", ".join(p.name for p in sorted(files.values()))
            problems.report(directory, f"{directory}: client {cid}: empty client (no records in {names})")
            continue
        clients.append(
            ClientData(
                client_id=cid,
                category=category[0],
                train=_keep(splits["training"], max_chars, max_train),
                eval=_keep(splits["eval"], max_chars, max_eval),
                test=_keep(splits["test"], max_chars, max_eval),
                num_train_full=n_train_full,
                heldout=False,
                flags=sorted(flags),
            )
        )
    return clients


# ----------------------------------------------------------------------------------------------
# Public API


def load_ni(
    path: str | os.PathLike[str],
    *,
    heldout_file: str | os.PathLike[str] | None = None,
    heldout_ids: Iterable[int] | None = None,
    max_train_per_client: int | None = None,
    max_eval_per_client: int | None = None,
    client_ids: Iterable[int] | None = None,
    max_chars: int | None = None,
    on_error: OnError = "raise",
    layout: Layout = "auto",
) -> list[ClientData]:
    """Load the FlexLoRA Natural Instructions clients (all of them, held-out ones flagged), sorted by id.

    ``path``: a compact ``*.jsonl.gz`` file, a directory with ``clients.jsonl.gz``, or a directory of
    official ``local_*_{i}.json`` files (``layout="auto"`` tells them apart).

    ``heldout_file`` / ``heldout_ids`` define the held-out set explicitly (they override the data's
    own marks); otherwise the directory's ``heldout_clients.json`` is used if present (for a compact
    directory it must agree with the records' ``heldout`` field), else the compact records' field;
    an official directory without any held-out source has no held-out clients.

    ``max_chars`` drops records with len(input) + len(output) > max_chars (the compact README's
    filter, 2000 there) before ``max_train_per_client`` / ``max_eval_per_client`` keep the first
    records in file order; ``max_eval_per_client`` also caps ``test``. ``num_train_full`` is always
    the full training-file size, so data-size weights do not change with the caps.

    ``client_ids`` restricts loading to these ids; an id that is not in the data raises DataError
    (warns with ``on_error="skip"``). See the module docstring for ``on_error``.
    """
    _check_positive("max_train_per_client", max_train_per_client)
    _check_positive("max_eval_per_client", max_eval_per_client)
    _check_positive("max_chars", max_chars, minimum=1)
    if layout not in ("auto", "compact", "official"):
        raise ValueError(f"layout must be 'auto', 'compact' or 'official', not {layout!r}")
    problems = Problems(on_error)
    explicit = _explicit_heldout(heldout_file, heldout_ids)
    wanted = None if client_ids is None else {int(c) for c in client_ids}
    p = Path(path)
    kind = detect_layout(p) if layout == "auto" else layout
    caps = (max_train_per_client, max_eval_per_client, max_chars)

    if kind == "compact":
        file = p / COMPACT_FILE if p.is_dir() else p
        clients = _load_compact(file, problems, wanted, *caps)
        dir_heldout = p / HELDOUT_FILE if p.is_dir() else None
        if explicit is None and dir_heldout is not None and dir_heldout.is_file():
            listed = read_heldout_file(dir_heldout)
            for c in clients:
                if c.heldout != (c.client_id in listed):
                    raise DataError(
                        f"{file}: client {c.client_id} has heldout={str(c.heldout).lower()} but {dir_heldout} "
                        f"{'lists' if c.client_id in listed else 'does not list'} it; the two files are out of sync"
                    )
    elif kind == "official":
        if not p.is_dir():
            raise DataError(f"{p}: the official layout is a directory of local_*_i.json files")
        clients = _load_official(p, problems, wanted, *caps)
        if explicit is None and (p / HELDOUT_FILE).is_file():
            explicit = read_heldout_file(p / HELDOUT_FILE)
    else:  # pragma: no cover - guarded above
        raise AssertionError(kind)

    if explicit is not None:
        for c in clients:
            c.heldout = c.client_id in explicit
    if wanted is not None:
        missing = sorted(wanted - {c.client_id for c in clients})
        if missing:
            problems.report(p, f"{p}: requested client ids not found (or skipped as bad): {missing[:20]}")
    problems.emit_warnings()
    return sorted(clients, key=lambda c: c.client_id)


def split_heldout(clients: Iterable[ClientData]) -> tuple[list[ClientData], list[ClientData]]:
    """(training clients, held-out clients): the single place deciding who may train.

    Raises ValueError on repeated client ids (a held-out copy could otherwise hide in training) and
    warns (DataWarning) when a training client has a task definition byte-identical to a held-out
    one (duplicated SNI tasks; the shipped held-out list keeps such groups together).
    """
    train: list[ClientData] = []
    heldout: list[ClientData] = []
    seen: set[int] = set()
    for c in clients:
        if c.client_id in seen:
            raise ValueError(f"client id {c.client_id} occurs more than once; ids must be unique")
        seen.add(c.client_id)
        (heldout if c.heldout else train).append(c)
    heldout_defs = {ex.instruction: c.client_id for c in heldout for ex in (c.train[:1] or c.eval[:1] or c.test[:1])}
    leaks = [
        (c.client_id, heldout_defs[ex.instruction])
        for c in train
        for ex in (c.train[:1] or c.eval[:1] or c.test[:1])
        if ex.instruction in heldout_defs
    ]
    if leaks:
        warnings.warn(
            f"{len(leaks)} training client(s) share a task definition with a held-out client "
            f"(training, held-out): {leaks[:10]}; zero-shot results on those tasks are not unseen",
            DataWarning,
            stacklevel=2,
        )
    return train, heldout
