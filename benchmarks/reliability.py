"""Robustness figures: fuzzed inputs handled cleanly, and runs with 10/30/50% failing clients.

1. Fuzzing: every adapter mutation (``tests/fuzz.py``: ``ADAPTER_MUTATIONS``) and client-update mutation
   (``UPDATE_MUTATIONS``) applied many times with different seeds; an input is *handled cleanly*
   when the loader/aggregator raises its documented error (AdapterError / UpdateError) or the
   validator rejects the update with a reason — anything else (another exception, a hang, a file
   outside the output folder) counts as a failure.
2. Failing clients: the tiny-model smoke configuration with a fraction of the selected clients
   crashing, returning garbage (NaN, wrong shapes, absurd norms) or straggling past the timeout,
   equally split; does the run complete, who was dropped, and the final losses vs the failure-free run.
3. File safety: the real ``flexlora`` CLI (a subprocess) told to write into an input, a parent of one,
   the working directory, a link to an input, another run's folder or the user's own folder (refused,
   with and without --overwrite / --resume), and SIGKILLed at seeded moments while it writes (into a new
   folder and --overwrite of an earlier output). Counts: cases tried, user files lost and partial
   outputs left (both must be 0), stray staging folders left by a kill.

    python benchmarks/reliability.py [--quick] [--file-safety-only]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

from flexlora.aggregate_dirs import aggregate_adapter_dirs  # noqa: E402
from flexlora.config import load_config  # noqa: E402
from fuzz import ADAPTER_MUTATIONS, UPDATE_MUTATIONS, mutate_adapter, mutate_update  # noqa: E402
from flexlora.update import ClientUpdate, LoraFactors, UpdateError  # noqa: E402
from flexlora.validate import ValidationConfig, screen_updates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fuzz_adapters(per_mutation: int) -> dict:
    from tiny import make_peft_adapter  # the tests' helper: a real PEFT adapter of a tiny Llama

    tried = clean = 0
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pristine = [make_peft_adapter(root / "pristine" / f"a{i}", seed=i, r=2 + i) for i in range(2)]
        for mutation in ADAPTER_MUTATIONS:
            for seed in range(per_mutation):
                work = root / f"w-{mutation}-{seed}"
                inputs = [shutil.copytree(p, work / "in" / p.name) for p in pristine]
                mutate_adapter(inputs[1], mutation, random.Random(seed))
                before = sorted(p.relative_to(work) for p in work.rglob("*"))
                out = work / "out"
                tried += 1
                t0 = time.perf_counter()
                try:
                    aggregate_adapter_dirs(inputs, "flexlora", out)
                    ok = True  # a harmless mutation (e.g. a flipped bit in a weight) may still aggregate
                except UpdateError:
                    ok = True
                except Exception as e:  # noqa: BLE001 - this is what the benchmark counts
                    ok = False
                    failures.append(f"{mutation}/{seed}: {type(e).__name__}: {e}")
                after = sorted(p.relative_to(work) for p in work.rglob("*") if not p.is_relative_to(out))
                if after != before:
                    ok = False
                    failures.append(f"{mutation}/{seed}: wrote outside the output folder")
                if time.perf_counter() - t0 > 30:
                    ok = False
                    failures.append(f"{mutation}/{seed}: took over 30 s")
                clean += ok
                shutil.rmtree(work)
    return {"tried": tried, "handled_cleanly": clean, "failures": failures[:20]}


def fuzz_updates(per_mutation: int) -> dict:
    tried = clean = 0
    failures: list[str] = []
    shapes = {"a.q_proj": (6, 5), "a.down_proj": (5, 9)}
    for mutation in UPDATE_MUTATIONS:
        for seed in range(per_mutation):
            g = torch.Generator().manual_seed(seed)
            ups = [ClientUpdate(str(i), 10, {n: LoraFactors(torch.randn(2, di, generator=g), torch.randn(do, 2, generator=g), 8.0) for n, (do, di) in shapes.items()}) for i in range(4)]
            expected = {u.client_id: u.spec() for u in ups}
            tried += 1
            try:
                bad = mutate_update(ups[0], mutation, random.Random(seed))
                passed, rejected = screen_updates([bad] + ups[1:], shapes, expected, ValidationConfig())
                ok = "0" in rejected and len(passed) == 3
                if not ok:
                    failures.append(f"{mutation}/{seed}: not rejected")
            except UpdateError:
                ok = True
            except Exception as e:  # noqa: BLE001
                ok = False
                failures.append(f"{mutation}/{seed}: {type(e).__name__}: {e}")
            clean += ok
    return {"tried": tried, "handled_cleanly": clean, "failures": failures[:20]}


def failing_clients(fractions: list[float], rounds: int) -> list[dict]:
    from flexlora.models import load_model
    from flexlora.data.clients import load_clients
    from flexlora.simulate import Simulation

    rows = []
    base = load_config(ROOT / "configs" / "smoke.toml", [f"federation.rounds={rounds}", "federation.clients_per_round=6", "federation.min_clients=2", "eval.eval_loss=true", "eval.at_start=false"])
    model, tok = load_model(base.model)
    clients = load_clients(base)
    for frac in fractions:
        third = frac / 3
        cfg = load_config(
            ROOT / "configs" / "smoke.toml",
            [f"federation.rounds={rounds}", "federation.clients_per_round=6", "federation.min_clients=2", "eval.eval_loss=true", "eval.at_start=false",
             f"failures.crash={third}", f"failures.garbage={third}", f"failures.straggle={third}"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            sim = Simulation(cfg, Path(tmp) / "run", model=model, tokenizer=tok, clients=clients, progress=False)
            try:
                summary = sim.run()
                completed = True
                error = None
            except Exception as e:  # noqa: BLE001
                summary, completed, error = {}, False, f"{type(e).__name__}: {e}"
            finally:
                sim.server.restore_base()
            model = sim.server.model
            import json

            recs = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()] if completed else []
        reasons: dict[str, int] = {}
        for r in recs:
            for why in r.get("dropped", {}).values():
                key = why[0].split(":")[0].split(" (")[0][:60]
                reasons[key] = reasons.get(key, 0) + 1
        rows.append({
            "failing_fraction": frac,
            "completed": completed,
            "error": error,
            "dropped_updates": summary.get("dropped_updates"),
            "skipped_rounds": summary.get("skipped_rounds"),
            "drop_reasons": reasons,
            "final_train_loss": summary.get("final_train_loss"),
            "final_eval_loss": summary.get("proxy_eval_loss"),
            "rouge_l_weighted": summary.get("rouge_l_weighted"),
        })
        print(f"failing {frac:.0%}: completed={completed} dropped={summary.get('dropped_updates')} eval loss={summary.get('proxy_eval_loss')} reasons={reasons}")
    return rows


# ------------------------------------------------------------------------------------------------
# 3. File safety: the real CLI, as a subprocess, against output folders that put user files at risk
#    and killed (SIGKILL) in the middle of its writes.

CLI = [sys.executable, "-m", "flexlora.cli"]
SMOKE = str(ROOT / "configs" / "smoke.toml")
# a short run: two rounds (so a kill can fall between checkpoints), one training step, one eval example
FAST_RUN = ["federation.rounds=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]
STAGING_HINTS = (".tmp", ".staged")  # names of the temporary siblings flexlora writes through (fsutil, checkpoint)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _cli_env() -> dict[str, str]:
    """The CLI as a user runs it: this checkout's sources, no network, no progress bars."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def snapshot(area: Path) -> dict[str, str]:
    """Every entry under ``area`` (links not followed): 'dir', 'link:<target>' or the sha256 of a file's bytes."""
    import hashlib
    import os

    entries: dict[str, str] = {}
    for folder, dirs, files in os.walk(area):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(area))
            if path.is_symlink():
                entries[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                entries[rel] = "dir"
            else:
                entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def _lost(before: dict[str, str], after: dict[str, str], prefix: str | None = None) -> list[str]:
    """User entries (outside ``prefix``) that are gone or changed."""
    return [p for p, v in before.items() if (prefix is None or not _under(p, prefix)) and after.get(p) != v]


def _under(rel: str, prefix: str) -> bool:
    return rel == prefix or rel.startswith(prefix + "/")


def _strays(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """New temporary siblings (``.name.tmp-*``, ``.checkpoint.pt.staged``...) that a kill left behind."""
    new = [p for p in set(after) - set(before) if Path(p).name.startswith(".") and any(h in Path(p).name for h in STAGING_HINTS)]
    return sorted(p for p in new if not any(q != p and _under(p, q) for q in new))  # the outermost only


def _cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=_cli_env(), capture_output=True, text=True, timeout=timeout)


def _error_line(stderr: str, area: Path) -> str:
    return stderr.strip().splitlines()[-1].replace(str(area), "<area>") if stderr.strip() else ""


def _adapter_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter under ``folder``: its tensors, by adapter folder (what 'the same output' means)."""
    from safetensors.torch import load_file

    return {str(p.parent.relative_to(folder)): load_file(str(p)) for p in sorted(folder.rglob("adapter_model.safetensors"))}


def _same_tensors(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][t], b[k][t]) for t in a[k]) for k in a)


def _user_area(root: Path, pristine: Path) -> dict[str, Path]:
    """A user's folder: two PEFT adapters, own notes beside them, a Dolly-style data file, a folder of
    their own work, and (copied) a finished flexlora run."""
    work = root / "work"
    shutil.copytree(pristine / "adapters", work)
    (work / "notes.txt").write_text("the user's own notes beside the adapters\n")
    data = root / "mydata"
    data.mkdir()
    (data / "dolly.jsonl").write_text("".join(  # enough for the default 20 clients: a run could start on it
        json.dumps({"instruction": f"Say {w} {i}.", "context": "", "response": f"{w} {i}", "category": c}) + "\n"
        for i in range(30) for w, c in (("yes", "open_qa"), ("no", "classification"), ("maybe", "brainstorming"))))
    (data / "README.md").write_text("where this data came from\n")
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    (mine / "config.json").write_text('{"my": "own settings"}\n')  # names a run also writes
    (mine / "metrics.jsonl").write_text('{"my": "own measurements"}\n')
    shutil.copytree(pristine / "other-run", root / "other-run", symlinks=True)
    return {"work": work, "a": work / "clientA", "b": work / "clientB", "data": data / "dolly.jsonl", "mine": mine, "other_run": root / "other-run"}


def refusal_cases() -> list[dict]:
    """(command, case, flags, output, cwd, expected) for every risky output folder."""
    cases = []
    where_aggregate = {
        "an input": ("{a}", "{root}"),
        "parent of an input": ("{work}", "{root}"),
        "inside an input": ("{a}/shares", "{root}"),
        "the working directory": (".", "{work}"),
        "a symlink to an input": ("{root}/link", "{root}"),
        "a folder of another flexlora run": ("{other_run}", "{root}"),
        "a non-empty folder of the user's own files": ("{mine}", "{root}"),
    }
    for case, (out, cwd) in where_aggregate.items():
        for flags in ([], ["--overwrite"]):
            expected = "replaced whole" if case.startswith("a folder of another") and flags == ["--overwrite"] else "refused"
            cases.append({"command": "aggregate", "case": case, "flags": flags, "out": out, "cwd": cwd, "expected": expected})
    where_run = {
        "an input": ("{data}", "{root}"),
        "parent of an input": ("{data_dir}", "{root}"),
        "inside an input": ("{data_dir}/dolly.jsonl/run", "{root}"),
        "the working directory": (".", "{data_dir}"),
        "a symlink to an input": ("{root}/link", "{root}"),
        "a folder of another flexlora run": ("{other_run}", "{root}"),
        "a non-empty folder of the user's own files": ("{mine}", "{root}"),
    }
    for case, (out, cwd) in where_run.items():
        for flags in ([], ["--overwrite"], ["--resume"]):
            expected = "replaced whole" if case.startswith("a folder of another") and flags == ["--overwrite"] else "refused"
            cases.append({"command": "run", "case": case, "flags": flags, "out": out, "cwd": cwd, "expected": expected})
    return cases


def try_refusal(case: dict, root: Path, pristine: Path) -> dict:
    """One risky output folder through the real CLI: exit 2, one line, nothing of the user's changed, nothing new."""
    import os

    root.mkdir()
    paths = _user_area(root, pristine)
    names = {"root": root, "work": paths["work"], "a": paths["a"], "data": paths["data"], "data_dir": paths["data"].parent,
             "mine": paths["mine"], "other_run": paths["other_run"]}
    out, cwd = case["out"].format(**names), Path(case["cwd"].format(**names))
    if case["case"] == "a symlink to an input":
        os.symlink(paths["a"] if case["command"] == "aggregate" else paths["data"].parent, root / "link")
    if case["command"] == "aggregate":
        args = ["aggregate", str(paths["a"]), str(paths["b"]), "--method", "flexlora", "--out", out, *case["flags"]]
    else:
        own_data = [] if case["case"].startswith("a folder of another") else ['data.kind="instruct"', f'data.path="{paths["data"]}"']
        args = ["run", "--config", SMOKE, "--out", out, "--quiet", *case["flags"], *_sets([*FAST_RUN, *own_data])]
    before = snapshot(root)
    proc = _cli(args, cwd)
    after = snapshot(root)
    row = {k: case[k] for k in ("command", "case", "flags", "expected")}
    row["exit_code"] = proc.returncode
    row["error"] = _error_line(proc.stderr, root) if proc.returncode else None
    if case["expected"] == "refused":
        lost = _lost(before, after)
        new = sorted(set(after) - set(before))
        one_line = "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        names_the_folder = out in proc.stderr  # refused for the folder, not for something else first
        row.update(ok=proc.returncode == 2 and one_line and names_the_folder and not lost and not new, one_line_error=one_line,
                   names_the_output_folder=names_the_folder)
    else:  # --overwrite of a flexlora output: replaced, whole, by the new result; nothing else touched
        rel = str(paths["other_run"].relative_to(root))
        lost = _lost(before, after, prefix=rel)
        new = sorted(p for p in set(after) - set(before) if not _under(p, rel))
        complete = proc.returncode == 0 and (paths["other_run"] / "summary.json").is_file() and (paths["other_run"] / "final" / "global").is_dir()
        if case["command"] == "aggregate":
            complete = proc.returncode == 0 and (paths["other_run"] / "report.json").is_file() and not (paths["other_run"] / "final").exists()
        row.update(ok=complete and not lost and not new, replaced_whole=complete)
    row["user_files_lost"] = lost
    row["partial_outputs_left"] = new
    return row


def _watch(args: list[str], cwd: Path, area: Path, kill_at: float | None = None) -> tuple[float, float | None, int]:
    """Run the CLI; with ``kill_at`` SIGKILL it that many seconds after start. Returns (seconds it ran,
    when its first write appeared under ``area``, exit code)."""
    import signal

    before = _names(area)
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, *args], cwd=cwd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_write = None
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if kill_at is not None and now >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        if first_write is None and kill_at is None and _names(area) != before:
            first_write = now
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    if kill_at is None and proc.returncode != 0:
        raise RuntimeError(f"reference {args[0]} failed: {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0, first_write, proc.returncode


def _names(area: Path) -> set[str]:
    """What is under ``area``, by name only: cheap enough to poll every 10 ms without slowing the command."""
    import os

    return {os.path.join(folder, n) for folder, dirs, files in os.walk(area) for n in dirs + files}


def kill_points(duration: float, first_write: float, count: int, rng: random.Random) -> list[float]:
    """``count`` seeded moments, one in each equal slice of the window in which the command writes
    (from just before its first write to its end: a kill during the imports proves nothing)."""
    start = max(0.0, 0.9 * first_write)
    width = (duration - start) / count
    return [round(start + width * (i + rng.random()), 3) for i in range(count)]


def interrupted_writes(root: Path, pristine: Path, points: int, rng: random.Random) -> tuple[list[dict], dict]:
    """SIGKILL ``aggregate`` and ``run`` (into a new folder, and --overwrite of an earlier output) at
    seeded moments; after each: inputs intact, output absent / complete / the old one intact / resumable."""
    rows: list[dict] = []
    reference: dict[str, dict] = {}
    ref_root = root / "reference"
    ref_root.mkdir(parents=True)
    ref_paths = _user_area(ref_root, pristine)
    agg_args = ["aggregate", str(ref_paths["a"]), str(ref_paths["b"]), "--method", "flexlora", "--out"]
    duration, first, _ = _watch([*agg_args, str(ref_root / "agg")], ref_root, ref_root)
    reference["aggregate"] = {"seconds": round(duration, 2), "first_write_s": round(first or 0.0, 2), "tensors": _adapter_tensors(ref_root / "agg")}
    run_args = ["--config", SMOKE, "--quiet", *_sets(FAST_RUN)]
    duration, first, _ = _watch(["run", "--out", str(ref_root / "run"), *run_args], ref_root, ref_root)
    reference["run"] = {"seconds": round(duration, 2), "first_write_s": round(first or 0.0, 2), "tensors": _adapter_tensors(ref_root / "run" / "final")}

    strays_checked: set[tuple[str, str]] = set()
    for command in ("aggregate", "run"):
        ref = reference[command]
        for mode in ("new folder", "--overwrite"):
            for i, moment in enumerate(kill_points(ref["seconds"], ref["first_write_s"], points, rng)):
                area = root / f"{command}-{mode.strip('-').replace(' ', '-')}-{i}"
                area.mkdir()
                paths = _user_area(area, pristine)
                out = area / "out"
                if mode == "--overwrite":  # an earlier, complete flexlora output of the same kind
                    shutil.copytree(ref_root / ("agg" if command == "aggregate" else "run"), out)
                    if command == "run":
                        (out / "summary.json").write_text((out / "summary.json").read_text() + "\n")  # tell the old run from the new
                args = ([*agg_args[:1], str(paths["a"]), str(paths["b"]), *agg_args[3:], str(out)] if command == "aggregate"
                        else ["run", "--out", str(out), *run_args])
                args += ["--overwrite"] if mode == "--overwrite" else []
                before = snapshot(area)
                _, _, code = _watch(args, area, area, kill_at=moment)
                after = snapshot(area)
                row = {"command": command, "mode": mode, "kill_at_s": moment, "killed": code == -9,
                       "user_files_lost": _lost(before, after, prefix="out")}
                strays = _strays(before, after)
                row["stray_staging"] = strays
                old = {p: v for p, v in before.items() if _under(p, "out")}
                now = {p: v for p, v in after.items() if _under(p, "out")}
                final = out if command == "aggregate" else out / "final"
                if not now:
                    state = "absent"
                elif mode == "--overwrite" and now == old:
                    state = "previous output intact"
                elif (out / ("report.json" if command == "aggregate" else "summary.json")).is_file() and now != old \
                        and _same_tensors(_adapter_tensors(final), ref["tensors"]):
                    state = "complete"
                elif command == "run":
                    resumed = _cli(["run", "--out", str(out), "--resume", *run_args], area)
                    ok = resumed.returncode == 0 and _same_tensors(_adapter_tensors(final), ref["tensors"])
                    state = "resumable" if ok else "partial"
                    row["resume_error"] = None if resumed.returncode == 0 else _error_line(resumed.stderr, area)
                else:
                    state = "partial"
                row["output"] = state
                if strays and (state == "resumable" or (command, mode) not in strays_checked):
                    # does a later complete command clean them, or leave them (ignored)? (a resume has just run;
                    # otherwise the command is rerun once per command and mode: a run costs seconds)
                    strays_checked.add((command, mode))
                    if state in ("absent", "previous output intact"):
                        _cli(args, area)
                    left = set(snapshot(area))
                    row["strays_after_a_later_run"] = "cleaned" if not set(strays) & left else "left in place (ignored)"
                rows.append(row)
                print(f"  {command} {mode:11s} killed at {moment:5.2f}s: output {state}; strays {len(strays)}; user files lost {len(row['user_files_lost'])}")
                shutil.rmtree(area)
    return rows, {k: {"seconds": v["seconds"], "first_write_s": v["first_write_s"]} for k, v in reference.items()}


def file_safety(kill_points_each: int, seed: int = 0) -> dict:
    """The campaign: refusals of risky output folders, then interrupted writes. Counts, per-case rows."""
    from tiny import make_peft_adapter

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        pristine = tmp_root / "pristine"
        make_peft_adapter(pristine / "adapters" / "clientA", seed=1, r=2)
        make_peft_adapter(pristine / "adapters" / "clientB", seed=2, r=4)
        proc = _cli(["run", "--config", SMOKE, "--out", str(pristine / "other-run"), "--quiet", *_sets([*FAST_RUN, "federation.seed=1"])], tmp_root)
        if proc.returncode != 0:
            raise RuntimeError(f"could not make the earlier run: {proc.stderr.strip().splitlines()[-1:]}")
        refusals = []
        for i, case in enumerate(refusal_cases()):
            row = try_refusal(case, tmp_root / f"refusal-{i}", pristine)
            refusals.append(row)
            print(f"  {row['command']:9s} --out {row['case']:44s} {' '.join(row['flags']) or '(no flag)':12s} exit {row['exit_code']} "
                  f"{'ok' if row['ok'] else 'FAILED'}  {(row['error'] or '')[:90]}")
            shutil.rmtree(tmp_root / f"refusal-{i}")
        kills, reference = interrupted_writes(tmp_root / "kills", pristine, kill_points_each, rng)
    lost = sum(len(r["user_files_lost"]) for r in refusals + kills)
    partial = sum(len(r["partial_outputs_left"]) for r in refusals) + sum(r["output"] == "partial" for r in kills)
    strays = [r for r in kills if r["stray_staging"]]
    return {
        "cases_tried": len(refusals) + len(kills),
        "user_files_lost": lost,
        "partial_outputs_left": partial,
        "refusal_cases": len(refusals),
        "refusals_as_expected": sum(r["ok"] for r in refusals),
        "kills": len(kills),
        "kills_that_hit_a_running_command": sum(r["killed"] for r in kills),
        "kill_outcomes": {s: sum(r["output"] == s for r in kills) for s in sorted({r["output"] for r in kills})},
        "kills_leaving_stray_staging": len(strays),
        "stray_staging_after_a_later_run": sorted({r.get("strays_after_a_later_run", "") for r in strays} - {""}),
        "reference_seconds": reference,
        "seed": seed,
        "kill_points_each": kill_points_each,
        "note": ("real CLI as a subprocess on PEFT adapters of a tiny random Llama and configs/smoke.toml (2 rounds, 1 step); "
                 "kill moments are seeded, one per equal slice of the window from just before the command's first write to its end; "
                 "'user files lost' counts entries outside the output that changed or vanished; 'partial outputs left' counts new "
                 "entries after a refusal plus killed outputs that are neither absent, complete, the previous output intact, nor resumable "
                 "to the uninterrupted run's exact adapters; --overwrite of a flexlora output replaces it by design"),
        "refusals": refusals,
        "interrupted_writes": kills,
    }


def print_file_safety(fs: dict) -> None:
    print(f"{'file safety':28s} {'count':>6s}")
    for key in ("cases_tried", "refusal_cases", "refusals_as_expected", "kills", "kills_that_hit_a_running_command",
                "user_files_lost", "partial_outputs_left", "kills_leaving_stray_staging"):
        print(f"{key.replace('_', ' '):28s} {fs[key]:6d}")
    print(f"kill outcomes: {fs['kill_outcomes']}; strays after a later run: {fs['stray_staging_after_a_later_run']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer fuzz seeds, rounds and kill points")
    ap.add_argument("--file-safety-only", action="store_true", help="only the file-safety campaign (3); the other parts' results are kept")
    args = ap.parse_args()
    path = RESULTS_DIR / ("reliability_quick.json" if args.quick else "reliability.json")
    if args.file_safety_only:
        result = json.loads(path.read_text()) if path.exists() else {"benchmark": "reliability"}
    else:
        n = 3 if args.quick else 25
        adapters = fuzz_adapters(n)
        print(f"adapter fuzzing: {adapters['handled_cleanly']}/{adapters['tried']} handled cleanly")
        updates = fuzz_updates(n * 4)
        print(f"update fuzzing: {updates['handled_cleanly']}/{updates['tried']} handled cleanly")
        runs = failing_clients([0.0, 0.1, 0.3, 0.5], rounds=2 if args.quick else 4)
        ref = runs[0]
        for r in runs[1:]:
            if r["final_eval_loss"] is not None and ref["final_eval_loss"] is not None:
                r["eval_loss_vs_failure_free"] = r["final_eval_loss"] - ref["final_eval_loss"]
        result = {
            "benchmark": "reliability",
            "fuzz_adapters": adapters,
            "fuzz_updates": updates,
            "failing_clients": runs,
            "note": "tiny random Llama (configs/smoke.toml): its Rouge-L is ~0, so the eval loss proxy is the quality figure here",
            "environment": environment(),
        }
    print("file safety: refusals, then kills")
    fs = file_safety(kill_points_each=2 if args.quick else 5)
    fs["environment"] = environment()  # its own: the campaign may run alone (--file-safety-only)
    result["file_safety"] = fs
    print_file_safety(fs)
    print(f"-> {write_json(path, result)}")


if __name__ == "__main__":
    main()
