"""Data loaders, partitioners and the built-in suite: real NI files, both layouts, bad data, determinism."""

from __future__ import annotations

import datetime
import gzip
import json
import random
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest

from flexlora.data.instruct import load_instruct, partition_by_category, partition_dirichlet
from flexlora.data.ni import DataWarning, infer_train_size, load_ni, read_heldout_file, split_heldout
from flexlora.data.suite import SUITE_CATEGORIES, SUITE_TASKS, make_suite, split_tasks
from flexlora.data.types import ClientData, DataError, Example

NI_DIR = Path(__file__).parents[1].parent / "shared" / "data" / "flexlora-ni"
TINY = NI_DIR / "tiny.jsonl.gz"
TINY_HELDOUT = {268, 531, 949}  # tiny clients marked held-out in the compact file


def _need_ni() -> None:
    if not TINY.is_file():
        pytest.skip(f"NI data not found at {NI_DIR}")


def _tiny_lines() -> list[dict]:
    with gzip.open(TINY, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_gz_lines(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _write_official(directory: Path, lines: list[dict]) -> Path:
    """The official FederatedScope layout rebuilt from compact lines (test split left empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    for d in lines:
        def records(items: list[dict]) -> list[dict]:
            return [
                {"instruction": d["definition"], "input": r["input"], "output": r["output"], "category": d["category_raw"]} for r in items
            ]

        i = d["client_id"]
        (directory / f"local_training_{i}.json").write_text(json.dumps(records(d["train"])), encoding="utf-8")
        (directory / f"local_eval_{i}.json").write_text(json.dumps(records(d["eval"])), encoding="utf-8")
        (directory / f"local_test_{i}.json").write_text("[]", encoding="utf-8")
    return directory


def _client_line(cid: int, **overrides) -> str:
    d = {
        "client_id": cid,
        "category": "Misc.",
        "definition": f"Do task {cid}.",
        "n_train_full": 10,
        "train": [{"input": f"in{j}", "output": f"out{j}"} for j in range(3)],
        "eval": [{"input": "e", "output": "f"}],
        "heldout": False,
        "flags": [],
    }
    d.update(overrides)
    return json.dumps(d)


# ------------------------------------------------------------------------------------------------
# Natural Instructions


def test_ni_tiny_compact() -> None:
    _need_ni()
    clients = load_ni(TINY)
    assert len(clients) == 48
    assert [c.client_id for c in clients] == sorted(c.client_id for c in clients)
    assert {c.client_id for c in clients if c.heldout} == TINY_HELDOUT
    for c in clients:
        assert len(c.train) == 8 and len(c.eval) == 4 and c.num_train_full >= 8 and c.category
        assert len({ex.instruction for ex in c.train + c.eval}) == 1  # one task per client
        assert c.num_examples == c.num_train_full
    capped = load_ni(TINY, max_train_per_client=2, max_eval_per_client=1, client_ids=[3, 42])
    assert [(c.client_id, len(c.train), len(c.eval)) for c in capped] == [(3, 2, 1), (42, 2, 1)]
    assert capped[0].train == clients[0].train[:2] and capped[0].num_train_full == clients[0].num_train_full


def test_ni_max_chars_filters_input_plus_output() -> None:
    _need_ni()
    full = {c.client_id: c for c in load_ni(TINY)}
    short = load_ni(TINY, max_chars=200)
    for c in short:
        kept = [ex for ex in full[c.client_id].train if len(ex.input) + len(ex.output) <= 200]
        assert c.train == kept


def test_ni_official_layout_matches_compact(tmp_path: Path) -> None:
    _need_ni()
    lines = _tiny_lines()
    official = _write_official(tmp_path / "official", lines)
    shutil.copy(NI_DIR / "heldout_clients.json", official / "heldout_clients.json")
    compact = load_ni(TINY)
    from_official = load_ni(official)
    assert [c.client_id for c in compact] == [c.client_id for c in from_official]
    for a, b in zip(compact, from_official):
        assert (a.category, a.train, a.eval, a.heldout, a.flags) == (b.category, b.train, b.eval, b.heldout, b.flags)
        assert b.num_train_full == len(b.train)  # the official file IS the full training set here
    # caps and client selection act the same way on both layouts
    kw = dict(max_train_per_client=3, max_eval_per_client=2, client_ids=[62, 268], max_chars=300)
    assert [(c.train, c.eval, c.heldout) for c in load_ni(TINY, **kw)] == [(c.train, c.eval, c.heldout) for c in load_ni(official, **kw)]


def test_ni_official_missing_training_file_like_compact(tmp_path: Path) -> None:
    ex = {"instruction": "Summarise.", "input": "x", "output": "y", "category": "Summarization 12.json"}
    (tmp_path / "local_eval_967.json").write_text(json.dumps([ex] * 64))
    (tmp_path / "local_test_967.json").write_text(json.dumps([ex] * 66))
    (tmp_path / "local_training_1.json").write_text(json.dumps([ex] * 3))
    (tmp_path / "local_eval_1.json").write_text(json.dumps([ex]))
    c1, c967 = load_ni(tmp_path)
    assert (c967.client_id, c967.category, c967.train, len(c967.eval), len(c967.test)) == (967, "Summarization", [], 64, 66)
    assert c967.num_train_full == 519  # the compact file's inferred value for client 967
    assert c967.flags == ["n_train_full_inferred", "train_file_missing_in_snapshot"]
    assert c1.flags == ["test_file_missing"] and c1.num_train_full == 3
    assert infer_train_size(64, 66) == 519 and infer_train_size(4, 0) is None


def test_heldout_clients_never_train(tmp_path: Path) -> None:
    _need_ni()
    clients = load_ni(TINY)
    train, held = split_heldout(clients)
    assert {c.client_id for c in held} == TINY_HELDOUT
    assert not {c.client_id for c in train} & {c.client_id for c in held}
    assert len(train) + len(held) == len(clients) and not any(c.heldout for c in train)
    # an explicit list replaces the file's marks, in both layouts
    official = _write_official(tmp_path / "official", _tiny_lines())
    for source in (TINY, official):
        train, held = split_heldout(load_ni(source, heldout_ids=[3, 42]))
        assert [c.client_id for c in held] == [3, 42] and not {3, 42} & {c.client_id for c in train}
    assert not any(c.heldout for c in load_ni(official))  # no held-out source: nothing held out
    hfile = tmp_path / "h.json"
    hfile.write_text(json.dumps([62]))
    assert [c.client_id for c in load_ni(official, heldout_file=hfile) if c.heldout] == [62]
    assert read_heldout_file(NI_DIR / "heldout_clients.json") >= TINY_HELDOUT
    # a repeated id (e.g. a held-out copy) is refused
    dup = [c for c in clients if c.client_id == 268]
    dup.append(ClientData(268, "x", [Example("a", "b", "c")], [], heldout=False))
    with pytest.raises(ValueError, match="268"):
        split_heldout(dup)


def test_split_heldout_warns_on_shared_definition() -> None:
    a = ClientData(1, "c", [Example("same task", "x", "y")], [])
    b = ClientData(2, "c", [Example("same task", "z", "w")], [], heldout=True)
    with pytest.warns(DataWarning, match=r"\(1, 2\)"):
        split_heldout([a, b])


def test_compact_dir_heldout_file_out_of_sync(tmp_path: Path) -> None:
    _write_gz_lines(tmp_path / "clients.jsonl.gz", [_client_line(0), _client_line(1, heldout=True)])
    (tmp_path / "heldout_clients.json").write_text(json.dumps({"client_ids": [0]}))
    with pytest.raises(DataError, match="out of sync"):
        load_ni(tmp_path)
    (tmp_path / "heldout_clients.json").write_text(json.dumps({"client_ids": [1]}))
    assert [c.heldout for c in load_ni(tmp_path)] == [False, True]
    (tmp_path / "heldout_clients.json").write_text(json.dumps({"ids": [1]}))
    with pytest.raises(DataError, match="heldout_clients.json: held-out file has no 'client_ids'"):
        load_ni(tmp_path)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"client_id": 1, "category": ', r"bad\.jsonl\.gz:2:\d+: invalid JSON"),
        (_client_line(1).replace('"definition"', '"definitionX"'), r"bad\.jsonl\.gz:2: client 1: missing field 'definition'"),
        (
            _client_line(1, train=[{"input": "a", "output": "b"}, {"input": 5, "output": "b"}]),
            r"bad\.jsonl\.gz:2: client 1: train\[1\]: field 'input' must be a string, got int",
        ),
        (_client_line(1, eval=[{"input": "a"}]), r"bad\.jsonl\.gz:2: client 1: eval\[0\]: missing field 'output'"),
        (_client_line(1, n_train_full="7"), r"bad\.jsonl\.gz:2: client 1: field 'n_train_full' must be an integer"),
        (_client_line(1, heldout="yes"), r"bad\.jsonl\.gz:2: client 1: field 'heldout'"),
        (_client_line(1, train=[], eval=[], n_train_full=0), r"bad\.jsonl\.gz:2: client 1: empty client"),
        (_client_line(0), r"bad\.jsonl\.gz:2: duplicate client_id 0 \(first on line 1\)"),
        ("[1, 2]", r"bad\.jsonl\.gz:2: a line must be a JSON object"),
    ],
)
def test_ni_bad_compact_line_names_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    path = _write_gz_lines(tmp_path / "bad.jsonl.gz", [_client_line(0), bad_line, _client_line(2)])
    with pytest.raises(DataError, match=expected):
        load_ni(path)
    with pytest.warns(DataWarning, match=expected):
        clients = load_ni(path, on_error="skip")
    assert {0, 2} <= {c.client_id for c in clients}


def test_ni_truncated_gzip(tmp_path: Path) -> None:
    good = _write_gz_lines(tmp_path / "good.jsonl.gz", [_client_line(i, train=[{"input": "w" * 3000, "output": "o"}]) for i in range(40)])
    data = good.read_bytes()
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: unreadable, truncated or corrupt"):
        load_ni(bad)
    with pytest.warns(DataWarning, match="cut.jsonl.gz"):
        partial = load_ni(bad, on_error="skip")
    assert 0 < len(partial) < 40 and [c.client_id for c in partial] == list(range(len(partial)))
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    with pytest.raises(DataError, match=r"garbage\.jsonl\.gz:1: unreadable"):
        load_ni(garbage)


def test_ni_bad_official_files(tmp_path: Path) -> None:
    rec = {"instruction": "Task.", "input": "a", "output": "b", "category": "Misc. 3.json"}
    (tmp_path / "local_training_0.json").write_text(json.dumps([rec, rec]))
    (tmp_path / "local_eval_0.json").write_text(json.dumps([rec]))
    (tmp_path / "local_training_5.json").write_text(json.dumps([rec, rec, {k: v for k, v in rec.items() if k != "output"}]))
    (tmp_path / "local_eval_5.json").write_text(json.dumps([rec]))
    with pytest.raises(DataError, match=r"local_training_5\.json: record 2: missing field 'output'"):
        load_ni(tmp_path)
    with pytest.warns(DataWarning, match=r"local_training_5\.json: record 2"):
        clients = load_ni(tmp_path, on_error="skip")
    assert [len(c.train) for c in clients] == [2, 2] and clients[0].category == "Misc."

    (tmp_path / "local_training_5.json").write_text('[\n  {"instruction": "Task.",\n  oops\n]')
    with pytest.raises(DataError, match=r"local_training_5\.json:3:\d+: invalid JSON"):
        load_ni(tmp_path)
    with pytest.warns(DataWarning):
        assert [c.client_id for c in load_ni(tmp_path, on_error="skip")] == [0]

    other = dict(rec, category="Translation 1.json")
    (tmp_path / "local_training_5.json").write_text(json.dumps([rec, other]))
    with pytest.raises(DataError, match=r"local_training_5\.json: record 1: category 'Translation' differs"):
        load_ni(tmp_path)

    for split in ("training", "eval"):
        (tmp_path / f"local_{split}_5.json").write_text("[]")
    with pytest.raises(DataError, match="client 5: empty client"):
        load_ni(tmp_path)
    with pytest.raises(DataError, match=r"requested client ids not found.*\[7\]"):
        load_ni(tmp_path, client_ids=[0, 7])


def test_ni_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_ni(tmp_path / "nope.jsonl.gz")
    with pytest.raises(DataError, match="neither clients.jsonl.gz nor local_training"):
        load_ni(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        load_ni(tmp_path, on_error="ignore")  # type: ignore[arg-type]


def test_ni_full_compact_file() -> None:
    """The full 13 MB split (loads in about a second)."""
    if not (NI_DIR / "clients.jsonl.gz").is_file():
        pytest.skip(f"NI data not found at {NI_DIR}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DataWarning: the shipped held-out list keeps duplicated tasks together
        clients = load_ni(NI_DIR)
        train, held = split_heldout(clients)
    assert len(clients) == 1614 and [c.client_id for c in clients] == list(range(1614))
    assert {c.client_id for c in held} == read_heldout_file(NI_DIR / "heldout_clients.json") and len(held) == 161
    assert len(train) == 1453 and not {c.client_id for c in train} & {c.client_id for c in held}
    assert sum(len(c.train) for c in clients) == 83_303 and sum(len(c.eval) for c in clients) == 17_968
    assert sum(c.num_train_full for c in clients) == 403_149 + 519  # source files + client 967's inferred size
    assert Counter(c.category for c in clients)["Translation"] == 394
    c967 = clients[967]
    assert c967.train == [] and c967.num_train_full == 519 and "train_file_missing_in_snapshot" in c967.flags


# ------------------------------------------------------------------------------------------------
# Generic instruction data


def test_load_instruct_both_conventions(tmp_path: Path) -> None:
    dolly = [
        {"instruction": "Name a colour.", "context": "", "response": "Red", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"},
    ]
    alpaca = [{"instruction": "Add.", "input": "1 2", "output": "3", "category": "math"}]
    (tmp_path / "d.json").write_text(json.dumps(dolly))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca) + "\n")
    assert load_instruct(tmp_path / "d.json") == [
        (Example("Name a colour.", "", "Red"), "open_qa"),
        (Example("Summarise.", "Long text.", "Short."), "summarization"),
    ]
    assert load_instruct(tmp_path / "a.jsonl") == [(Example("Add.", "1 2", "3"), "math")]
    no_cat = [{"instruction": "Hi.", "output": "Hello"}]
    (tmp_path / "n.json").write_text(json.dumps(no_cat))
    assert load_instruct(tmp_path / "n.json", default_category="general") == [(Example("Hi.", "", "Hello"), "general")]


def test_load_instruct_bad_records(tmp_path: Path) -> None:
    good = {"instruction": "Add.", "input": "1 2", "output": "3", "category": "math"}
    (tmp_path / "b.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "output": None}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'output' must be a string, got null"):
        load_instruct(tmp_path / "b.jsonl")
    with pytest.warns(DataWarning, match=r"b\.jsonl:3:\d+: invalid JSON"):
        assert len(load_instruct(tmp_path / "b.jsonl", on_error="skip")) == 1
    (tmp_path / "c.json").write_text(json.dumps([good, {**good, "response": "4"}, {"instruction": "x", "output": "y"}]))
    with pytest.raises(DataError, match=r"c\.json: record 1: fields 'response' and 'output' are both present and differ"):
        load_instruct(tmp_path / "c.json")
    (tmp_path / "c.json").write_text(json.dumps([good, {"instruction": "x", "output": "y"}]))
    with pytest.raises(DataError, match=r"c\.json: record 1: missing field 'category'"):
        load_instruct(tmp_path / "c.json")


def _records(per_category: dict[str, int]) -> list[tuple[Example, str]]:
    return [(Example(f"{cat} task", f"{cat}-{i}", str(i)), cat) for cat, n in per_category.items() for i in range(n)]


def _dominance(clients: list[ClientData], category_of: dict[Example, str]) -> float:
    """Mean share of a client's most frequent category (1 = single-category clients)."""
    shares = []
    for c in clients:
        counts = Counter(category_of[ex] for ex in c.train + c.eval)
        shares.append(max(counts.values()) / sum(counts.values()))
    return sum(shares) / len(shares)


def test_partition_dirichlet() -> None:
    records = _records({f"cat{k}": 60 + 10 * k for k in range(8)})
    category_of = {ex: cat for ex, cat in records}
    a = partition_dirichlet(records, num_clients=10, alpha=0.5, seed=3, min_size=5)
    b = partition_dirichlet(records, num_clients=10, alpha=0.5, seed=3, min_size=5)
    assert [(c.train, c.eval, c.category) for c in a] == [(c.train, c.eval, c.category) for c in b]
    assert [c.train for c in a] != [c.train for c in partition_dirichlet(records, 10, 0.5, seed=4, min_size=5)]
    every = Counter(ex for c in a for ex in c.train + c.eval)
    assert every == Counter(ex for ex, _ in records)  # each example exactly once
    assert all(len(c.train) + len(c.eval) >= 5 and c.num_train_full == len(c.train) for c in a)
    assert [c.client_id for c in a] == list(range(10))
    assert all(c.eval for c in a if len(c.train) + len(c.eval) >= 2)
    skewed = _dominance(partition_dirichlet(records, 10, alpha=0.05, seed=0), category_of)
    mixed = _dominance(partition_dirichlet(records, 10, alpha=100.0, seed=0), category_of)
    assert skewed > 0.7 and mixed < 0.4 and skewed > mixed + 0.3
    with pytest.raises(ValueError, match="cannot give"):
        partition_dirichlet(records[:5], num_clients=10, alpha=1.0, seed=0)


def test_partition_by_category() -> None:
    records = _records({"b": 20, "a": 5, "c": 1})
    clients = partition_by_category(records, eval_fraction=0.2, seed=1)
    assert [(c.client_id, c.category, len(c.train), len(c.eval)) for c in clients] == [(0, "a", 4, 1), (1, "b", 16, 4), (2, "c", 1, 0)]
    assert Counter(ex for c in clients for ex in c.train + c.eval) == Counter(ex for ex, _ in records)
    assert [c.eval for c in clients] == [c.eval for c in partition_by_category(records, eval_fraction=0.2, seed=1)]


# ------------------------------------------------------------------------------------------------
# Built-in suite


def _task(c: ClientData) -> str:
    (flag,) = [f for f in c.flags if f.startswith("task:")]
    return flag.removeprefix("task:")


def test_suite_deterministic_and_shaped() -> None:
    a = make_suite(num_train_clients=12, examples_per_client=16, eval_per_client=4, seed=7)
    assert a == make_suite(12, 16, 4, 7)
    assert a != make_suite(12, 16, 4, 8)
    train, held = split_heldout(a)
    assert len(train) == 12 and len(held) == 8 and len({c.client_id for c in a}) == 20
    assert {c.category for c in train[:8]} == set(SUITE_CATEGORIES)
    assert len({c.num_train_full for c in train}) > 5  # varied client sizes for data-size weighting
    assert abs(sum(c.num_train_full for c in train) / 12 - 16) < 1.5
    for c in a:
        assert c.num_train_full == len(c.train) and len(c.eval) == 4 and c.category in SUITE_CATEGORIES
        assert not {ex.input for ex in c.eval} & {ex.input for ex in c.train}  # eval never seen in training
        for ex in c.train + c.eval:
            assert ex.instruction and ex.input and len(ex.input) < 100
            assert 0 < len(ex.output) <= 60 and len(ex.output.split()) <= 7


def test_suite_heldout_tasks_are_unseen_but_share_categories() -> None:
    clients = make_suite(num_train_clients=64, examples_per_client=8, eval_per_client=2, seed=0)
    train, held = split_heldout(clients)
    train_tasks, held_tasks = {_task(c) for c in train}, {_task(c) for c in held}
    assert len(held_tasks) == 8 and not train_tasks & held_tasks
    assert len(train_tasks) == len(SUITE_TASKS) - 8  # 64 clients cover every training task twice
    assert {c.category for c in held} == {c.category for c in train} == set(SUITE_CATEGORIES)
    assert len(SUITE_TASKS) == 40 and len({t.name for t in SUITE_TASKS}) == 40
    # same task, different clients: different random instances
    by_task = {}
    for c in train:
        by_task.setdefault(_task(c), []).append(c)
    first, second = by_task["add"][:2]
    assert [ex.input for ex in first.train] != [ex.input for ex in second.train]
    for k in (0, 3, 20, 32):
        tr, ho = split_tasks(k)
        assert len(ho) == k and not {t.name for t in tr} & {t.name for t in ho} and {t.category for t in tr} == set(SUITE_CATEGORIES)
    assert not any(c.heldout for c in make_suite(3, 4, 1, 0, heldout_tasks=0))
    with pytest.raises(ValueError, match="heldout_tasks"):
        make_suite(3, 4, 1, 0, heldout_tasks=33)


def _independent_answer(task: str, inp: str) -> str | None:
    """Answers computed without the suite's code (None: task not checked here)."""
    nums = lambda: [int(x) for x in inp.replace(" and ", ",").split(",")]  # noqa: E731
    if task == "add":
        return str(sum(nums()))
    if task == "subtract":
        a, b = nums()
        return str(a - b)
    if task == "multiply":
        a, b = nums()
        return str(a * b)
    if task == "larger":
        return str(max(nums()))
    if task == "double":
        return str(int(inp) * 2)
    if task in ("max_number", "min_number"):
        return str((max if task == "max_number" else min)(nums()))
    if task == "sort_numbers":
        return ", ".join(str(n) for n in sorted(nums()))
    if task == "sum_list":
        return str(sum(nums()))
    if task == "dedupe":
        out: list[int] = []
        for n in nums():
            if n not in out:
                out.append(n)
        return ", ".join(map(str, out))
    if task == "reverse_words":
        return " ".join(inp.split()[::-1])
    if task == "uppercase":
        return inp.upper()
    if task == "last_word":
        return inp.split()[-1]
    if task == "count_words":
        return str(len(inp.split()))
    if task == "count_vowels":
        return str(len([ch for ch in inp if ch in "aeiou"]))
    if task == "spell_backwards":
        return "".join(reversed(inp))
    if task == "even_odd":
        return ["even", "odd"][int(inp) % 2]
    if task == "iso_date":
        return datetime.datetime.strptime(inp, "%B %d, %Y").date().isoformat()
    if task == "camel_case":
        first, *rest = inp.split()
        return first + "".join(w[0].upper() + w[1:] for w in rest)
    if task == "json_key_value":
        key, value = (part.split(": ", 1)[1] for part in inp.split(", "))
        return json.dumps({key: value})
    return None


def test_suite_answers_are_correct() -> None:
    clients = make_suite(num_train_clients=32, examples_per_client=24, eval_per_client=6, seed=11)
    checked = set()
    for c in clients:
        for ex in c.train + c.eval:
            want = _independent_answer(_task(c), ex.input)
            if want is not None:
                assert ex.output == want, (_task(c), ex.input, ex.output)
                checked.add(_task(c))
    assert len(checked) >= 15
    json_client = next(c for c in clients if _task(c) == "json_key_value")
    assert all(json.loads(ex.output) for ex in json_client.train)


def test_suite_large_requests_and_small_input_spaces() -> None:
    rng = random.Random(0)
    clients = make_suite(num_train_clients=100, examples_per_client=100, eval_per_client=16, seed=rng.randint(0, 99))
    assert len(clients) == 108 and [c.client_id for c in clients] == list(range(108))
    multiply = [c for c in clients if _task(c) == "multiply"]  # only 121 possible inputs
    assert multiply and all(not {e.input for e in c.eval} & {e.input for e in c.train} for c in multiply)
    with pytest.raises(ValueError, match="num_train_clients"):
        make_suite(0, 4, 1, 0)
