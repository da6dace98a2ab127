"""What a run writes into its folder, for every runner (the simulator and the Flower server):
``config.json``, one ``metrics.jsonl`` line per round (written once the round's checkpoint is in
place), the checkpoints (:mod:`flexlora.checkpoint`, written on a thread while the next round trains),
``summary.json`` and ``final/`` (written whole or not at all). Resuming reads them back: a checkpoint
made with another config is refused, a complete run is left as it is.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from torch import Tensor

from flexlora.checkpoint import CheckpointWriter, load_checkpoint, state_from_dict, state_to_dict
from flexlora.config import ConfigError, RunConfig, config_changes, config_fingerprint
from flexlora.fsutil import atomic_directory, atomic_write_text, mark_output
from flexlora.update import ServerState

if TYPE_CHECKING:  # pragma: no cover
    from flexlora.rounds import RoundEngine

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass
class Start:
    """Where a run starts: round 1 with the method's initial state, or after a checkpoint's round;
    ``complete`` holds the summary of a run that has nothing left to do."""

    round: int
    state: ServerState | None  # None when ``complete``
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics lines of the rounds done
    complete: dict[str, Any] | None = None


class RunOutput:
    """The run folder ``out`` of a run with config ``cfg``."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.fingerprint = config_fingerprint(cfg)
        self.writer = CheckpointWriter(self.out)  # a round's checkpoint lands while the next one trains
        self.last_good: tuple[int, ServerState] | None = None  # the last finished round and its whole state

    # -- the start ---------------------------------------------------------------------------------
    def start(self, resume: bool, engine: "RoundEngine") -> Start:
        """Resume from the folder's checkpoint (``engine`` gets its merged update and clients' state
        back) or start afresh; writes ``config.json`` and the metrics of the rounds kept."""
        cfg, out = self.cfg, self.out
        had_files = out.is_dir() and any(out.iterdir())
        ckpt = load_checkpoint(out) if resume else None
        if ckpt is not None:
            self.check_resumable(ckpt)
            done = read_summary(out)
            if ckpt["round"] >= cfg.federation.rounds and done is not None and done.get("rounds") == ckpt["round"]:
                print(
                    f"{cfg.name}: {out} is a complete run ({ckpt['round']} of {cfg.federation.rounds} rounds): nothing to do; "
                    f"--set federation.rounds=N (N > {ckpt['round']}) extends it",
                    file=sys.stderr,
                )
                return Start(ckpt["round"] + 1, None, complete=done)
            planned = (ckpt.get("config") or {}).get("federation", {}).get("rounds", cfg.federation.rounds)
            if planned < cfg.federation.rounds:
                print(f"{cfg.name}: extending the run from {planned} to {cfg.federation.rounds} rounds (resuming after round {ckpt['round']})", file=sys.stderr)
        elif resume and had_files:
            print(f"{cfg.name}: {out} holds no checkpoint yet (the run stopped in round 1): starting at round 1", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "run")
        start = Start(1, engine.method.initial_state(engine.fed.shapes))
        if ckpt is not None:
            start = Start(ckpt["round"] + 1, state_from_dict(ckpt["state"]), read_metrics(out / METRICS, upto=ckpt["round"]))
            engine.merged = ckpt["merged"]
            engine.client_state = ckpt["client_state"]
            if ckpt.get("record") and (not start.history or start.history[-1].get("round", 0) < ckpt["round"]):
                start.history.append(ckpt["record"])  # killed between the checkpoint and its metrics line
        elif resume is False and (out / METRICS).exists():
            (out / METRICS).unlink()
        write_metrics(out / METRICS, start.history)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
        return start

    def check_resumable(self, ckpt: dict[str, Any]) -> None:
        """Refuse a checkpoint made with another config. Raising ``federation.rounds`` is not a change
        but an extension: everything a round does is seeded by (seed, round), not by the number of rounds,
        so the extended run gives an uninterrupted longer run's adapters (its metrics hold one more
        evaluation: the old last round's)."""
        cfg = self.cfg
        if ckpt["fingerprint"] == self.fingerprint:
            return
        saved = ckpt.get("config") or saved_config(self.out)
        if saved is None:
            changed = ["(the checkpoint's config is not saved beside it)"]
        else:
            changed = config_changes(saved, cfg, allowed=("federation.rounds",))
            if cfg.federation.rounds < ckpt["round"]:
                changed.insert(0, f"federation.rounds = {cfg.federation.rounds} is below the checkpoint's round {ckpt['round']} (rounds can only be raised)")
        if changed:
            raise ConfigError(
                f"{self.out}: the checkpoint was made with a different config ({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}); "
                "resume with the same config (only federation.rounds may be raised) or use a new --out"
            )

    # -- every round -------------------------------------------------------------------------------
    def append(self, rec: dict[str, Any]) -> None:
        """A metrics line written now (the evaluation before round 1)."""
        append_metrics(self.out / METRICS, rec)

    def end_round(self, rnd: int, rec: dict[str, Any], state: ServerState, engine: "RoundEngine", started: float) -> dict[str, Any]:
        """Checkpoint the round (on the writer's thread) and append its metrics line once the checkpoint
        is in place; returns the record as plain data (what the metrics line holds)."""
        cfg, writer = self.cfg, self.writer
        rec.setdefault("timings", {})
        rec = json.loads(json.dumps(rec, sort_keys=True, default=json_default))  # plain data from here on
        t_ckpt = time.perf_counter()
        writer.wait()  # the previous round's write (long done: a round trained since)
        # what the background write reads: this round's state (never changed in place) and copies of
        # the containers the next round changes
        snapshot = {
            "round": rnd,
            "fingerprint": self.fingerprint,
            "config": cfg.to_dict(),
            "merged": dict(engine.merged),
            "client_state": copy.deepcopy(engine.client_state),
            "record": copy.deepcopy(rec),
        }
        last_round = rnd == cfg.federation.rounds

        def payload(snapshot: dict[str, Any] = snapshot, state: ServerState = state, last_round: bool = last_round) -> dict[str, Any]:
            return {**snapshot, "state": state_to_dict(engine.checkpoint_state(state, last_round=last_round))}

        self.last_good = (rnd, state)  # whole, unlike a checkpoint between rounds (see RoundEngine.checkpoint_state)
        rec["timings"]["checkpoint"] = time.perf_counter() - t_ckpt  # what the round waited for; the write goes on behind
        rec["timings"]["round"] = time.perf_counter() - started  # everything above, wall clock

        def landed(rec: dict[str, Any] = rec) -> None:  # the metrics line only once its checkpoint is in place
            rec["timings"]["checkpoint_write"] = writer.last_write_seconds
            append_metrics(self.out / METRICS, rec)

        writer.start(payload, then=landed)
        return rec

    @contextmanager
    def rounds(self) -> Iterator[None]:
        """Around the round loop: the last checkpoint lands (an error of the loop itself wins)."""
        try:
            yield
            self.writer.wait()
        finally:
            self.writer.wait(raise_error=False)

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any], write_final: Callable[[Path], None]) -> dict[str, Any]:
        """``final/`` (whole and new: never mixed with an older run's adapters), then ``summary.json``."""
        final = self.out / "final"
        with atomic_directory(final) as staging:
            write_final(staging)
        summary = {**summary, "final_adapters": str(final)}
        write_json(self.out / SUMMARY, summary)
        return summary


# -- the files -----------------------------------------------------------------------------------
def saved_config(out: Path) -> dict[str, Any] | None:
    """A checkpoint written before checkpoints carried their config: the run's config.json."""
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None


def read_summary(out: Path) -> dict[str, Any] | None:
    """A finished run's summary.json (None when the run has not finished)."""
    try:
        return json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def append_metrics(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True, default=json_default) + "\n")
        f.flush()


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(h, sort_keys=True, default=json_default) + "\n" for h in history))


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is redone
        if rec.get("round", 0) <= upto:
            out.append(rec)
    return out


def json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
