"""Generic instruction data with a category field (Dolly-15K style) and its federated partitioners.

Accepted records (JSON list or JSONL, plain or gzip, detected by content):
``instruction`` (required), ``context`` or ``input`` (optional, default ""), ``response`` or
``output`` (required), ``category`` (required unless ``default_category`` is given). Both naming
conventions are accepted because Dolly uses context/response and Alpaca-style sets use input/output;
a record holding both names with different values is rejected as ambiguous.

Partitioners turn ``(example, category)`` records into clients:

* :func:`partition_dirichlet` is FedIT's recipe (Shepherd ``client_data_allocation.py``, itself the
  NIID-Bench label-skew split): per category, shuffle its examples and cut them among clients with
  proportions ~ Dirichlet(alpha), giving no further examples to clients that already hold N/K;
  redraw everything until each client has ``min_size`` examples. Small alpha -> each client is
  dominated by few categories; large alpha -> near-uniform mixes.
* :func:`partition_by_category` gives one category per client (the NI setting: one task per client).

Errors follow :mod:`flexlora.data.ni`: DataError naming ``file:line`` (JSONL) or ``file: record N``
(JSON list, 0-based), or with ``on_error="skip"`` the bad record is dropped and one
:class:`~flexlora.data.records.DataWarning` per file lists what was dropped.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flexlora.data.records import BadRecord, OnError, Problems, get_str, iter_jsonl, load_json, open_binary, require_file, type_name
from flexlora.data.types import ClientData, DataError, Example

Record = tuple[Example, str]

_INPUT_KEYS = ("context", "input")
_OUTPUT_KEYS = ("response", "output")


def _one_of(obj: dict[str, Any], keys: tuple[str, str], *, required: bool) -> str:
    """The value under either name; both present must agree (else the record is ambiguous)."""
    present = [k for k in keys if k in obj]
    if not present:
        if required:
            raise BadRecord(f"missing field {keys[0]!r} (or {keys[1]!r})")
        return ""
    values = [get_str(obj, k) for k in present]
    if len(values) == 2 and values[0] != values[1]:
        raise BadRecord(f"fields {keys[0]!r} and {keys[1]!r} are both present and differ")
    return values[0]


def _parse_record(obj: Any, default_category: str | None) -> Record:
    if not isinstance(obj, dict):
        raise BadRecord(f"must be a JSON object, got {type_name(obj)}")
    instruction = get_str(obj, "instruction", nonempty=True)
    inp = _one_of(obj, _INPUT_KEYS, required=False)
    out = _one_of(obj, _OUTPUT_KEYS, required=True)
    if "category" in obj or default_category is None:
        category = get_str(obj, "category", nonempty=True)
    else:
        category = default_category
    return Example(instruction, inp, out), category


def _is_json_list(path: Path) -> bool:
    """True if the first non-blank byte is '[' (a JSON list), else the file is read as JSONL."""
    with open_binary(path) as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1] == b"["
    return False


def _raw_items(path: Path, problems: Problems) -> Iterator[tuple[str, Any]]:
    """(location prefix, parsed object) for each record of a JSON list or JSONL file."""
    try:
        as_list = _is_json_list(path)
    except (OSError, EOFError, zlib.error) as e:
        problems.report(path, f"{path}: unreadable or corrupt file ({type(e).__name__}: {e})")
        return
    if as_list:
        ok, data = load_json(path, problems)
        if ok:
            for i, obj in enumerate(data):
                yield f"{path}: record {i}", obj
    else:
        for lineno, obj in iter_jsonl(path, problems):
            yield f"{path}:{lineno}", obj


def load_instruct(
    path: str | os.PathLike[str], *, on_error: OnError = "raise", default_category: str | None = None
) -> list[Record]:
    """(example, category) records in file order; see the module docstring for formats and errors."""
    p = Path(path)
    require_file(p)
    problems = Problems(on_error)
    records: list[Record] = []
    for where, obj in _raw_items(p, problems):
        try:
            records.append(_parse_record(obj, default_category))
        except BadRecord as e:
            problems.report(p, f"{where}: {e}")
    if not records:
        problems.report(p, f"{p}: no usable records")
    problems.emit_warnings()
    return records


# ----------------------------------------------------------------------------------------------
# Partitioners


def _eval_count(n: int, eval_fraction: float) -> int:
    """round-half-up(n * fraction), at least 1 when the fraction is positive and n >= 2, at most n - 1
    (every client keeps a training example and, when it can, an evaluation one)."""
    if n <= 1 or eval_fraction <= 0:
        return 0
    return min(n - 1, max(1, int(n * eval_fraction + 0.5)))


def _check_eval_fraction(eval_fraction: float) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")


def _make_client(client_id: int, category: str, items: Sequence[Example], eval_fraction: float) -> ClientData:
    """Split an already shuffled list into eval (first) and train (rest)."""
    k = _eval_count(len(items), eval_fraction)
    train = list(items[k:])
    return ClientData(client_id=client_id, category=category, train=train, eval=list(items[:k]), num_train_full=len(train))


def _majority(categories: list[str]) -> str:
    counts = Counter(categories)
    return min(counts, key=lambda c: (-counts[c], c))


def partition_dirichlet(
    records: Sequence[Record],
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    eval_fraction: float = 0.1,
    max_tries: int = 1000,
) -> list[ClientData]:
    """FedIT's Dirichlet split of ``records`` over ``num_clients`` clients (deterministic for ``seed``).

    Every record goes to exactly one client (train or eval). A client's ``category`` is its most
    frequent category (ties: alphabetical); its eval split is a seeded random ``eval_fraction``.
    Raises ValueError when the data cannot give every client ``min_size`` records (too few records,
    or ``max_tries`` draws failed: raise alpha or lower min_size).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    _check_eval_fraction(eval_fraction)
    n = len(records)
    if n < num_clients * min_size:
        raise ValueError(f"{n} records cannot give {num_clients} clients at least {min_size} each")
    by_category: dict[str, list[int]] = {}
    for i, (_, cat) in enumerate(records):
        by_category.setdefault(cat, []).append(i)
    rng = np.random.default_rng(seed)
    cap = n / num_clients
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cat in sorted(by_category):
            idx = np.array(by_category[cat])
            rng.shuffle(idx)
            open_ = np.array([len(part) < cap for part in parts], dtype=float)
            proportions = rng.dirichlet(np.full(num_clients, alpha)) * open_
            total = proportions.sum()
            # Tiny alpha can underflow every open client's share to 0: share evenly among them then.
            proportions = proportions / total if total > 0 else open_ / open_.sum()
            cuts = (np.cumsum(proportions) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            break
    else:
        raise ValueError(
            f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave all {num_clients} clients >= {min_size} records; "
            "raise alpha, lower min_size or use fewer clients"
        )
    clients = []
    for cid, part in enumerate(parts):
        order = rng.permutation(len(part))
        items = [part[j] for j in order]
        category = _majority([records[i][1] for i in items]) if items else ""
        clients.append(_make_client(cid, category, [records[i][0] for i in items], eval_fraction))
    return clients


def partition_by_category(records: Sequence[Record], eval_fraction: float = 0.1, seed: int = 0) -> list[ClientData]:
    """One client per category (ids in sorted category order), each with a seeded random eval split."""
    _check_eval_fraction(eval_fraction)
    if not records:
        raise DataError("no records to partition")
    by_category: dict[str, list[Example]] = {}
    for ex, cat in records:
        by_category.setdefault(cat, []).append(ex)
    rng = np.random.default_rng(seed)
    clients = []
    for cid, cat in enumerate(sorted(by_category)):
        exs = by_category[cat]
        order = rng.permutation(len(exs))
        clients.append(_make_client(cid, cat, [exs[j] for j in order], eval_fraction))
    return clients


# ----------------------------------------------------------------------------------------------
# Held-out clients: instruct data is evaluated like NI, on clients that never train


def heldout_count(num_clients: int, count: int | None, fraction: float | None, default_fraction: float = 0.1) -> int:
    """How many of ``num_clients`` clients to hold out: ``count``, else round-half-up(fraction * n)
    (``default_fraction`` when neither is given), at least 1 for a positive fraction, and never so
    many that no client is left to train: a count or fraction the user set that leaves none is refused
    (naming the key), the default fraction of a one-client data set holds out none."""
    if count is not None:
        k = count
    else:
        f = default_fraction if fraction is None else fraction
        k = max(1, int(num_clients * f + 0.5)) if f > 0 else 0
    if k >= num_clients and (count is not None or fraction is not None):
        key = f"data.heldout_clients = {count}" if count is not None else f"data.heldout_fraction = {fraction} ({k} clients)"
        raise DataError(f"{key} holds out every one of the {num_clients} clients the data makes: at least one must train (hold out at most {num_clients - 1})")
    return max(0, min(k, num_clients - 1))


def mark_heldout(clients: Sequence[ClientData], ids: set[int], source: str, *, evaluate_all_records: bool) -> None:
    """Mark exactly the clients in ``ids`` as held out (``source`` names where the ids came from in
    errors). With ``evaluate_all_records`` a held-out client's training records join its eval split:
    it never trains, so every one of its records is unseen (``num_train_full`` keeps its size weight)."""
    known = {c.client_id for c in clients}
    missing = sorted(ids - known)
    if missing:
        raise DataError(f"{source}: lists client ids that the data does not have: {missing[:10]} (ids are 0..{max(known)})")
    for c in clients:
        c.heldout = c.client_id in ids
        if c.heldout and evaluate_all_records and c.train:
            c.num_train_full = c.num_examples
            c.eval, c.train = c.eval + c.train, []


def seeded_heldout_ids(clients: Sequence[ClientData], count: int, seed: int) -> set[int]:
    """``count`` client ids drawn with ``seed`` (the same clients for the same data and seed)."""
    ids = sorted(c.client_id for c in clients)
    rng = np.random.default_rng(seed)
    return {ids[i] for i in rng.choice(len(ids), size=count, replace=False)} if count else set()
