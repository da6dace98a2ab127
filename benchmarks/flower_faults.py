#!/usr/bin/env python3
"""The Flower deployment under faults: a fault campaign on 127.0.0.1.

One SuperLink, three SuperNodes (the three clients of ``configs/smoke.toml`` at three rank types),
the project's own ``flower_app``, 3 rounds, every process started here and stopped by its PID;
faults are SIGKILLs at chosen moments. Each scenario runs from a fresh folder:

* ``baseline``: no fault; ``final/`` against the in-process simulator's, file by file.
* ``node-killed``: the node of client 0 SIGKILLed in round 2 (1 s after round 2's message reached
  it, read from its own log) and left dead (min-clients 1).
* ``node-restarted``: the same kill, and the node restarted 10 s later with the same command.
* ``superlink-restart``: the SuperLink (and the ServerApp under it) SIGKILLed in round 2 (1 s after
  round 2's message reached every node), restarted on the same port; the SuperNodes are supervised (restarted whenever they exit, as
  ``Restart=always`` does; their exit codes are recorded) and the run is resumed
  (``resume = true``, same ``out``); ``final/`` against the uninterrupted run's.
* ``garbage``: ``failures.garbage = 0.4``: each node sends garbage (NaN, a wrong shape, a norm
  x1e4) when its seeded draw says so; ``final/`` against the simulator's with the same failures.
* ``too-few-nodes``: min-clients 3 and the node of client 0 SIGKILLed in round 2: the run must
  stop, say so in ``summary.json`` and in ``flexlora status`` (exit 1).

``--rounds`` and ``--kill-round`` move the kill (the slow test kills in round 1 of 2: one round
less to wait for). Per scenario: rounds completed, every dropped update with its reason, the run's status, the byte
comparison of ``final/``, exit codes (``flwr run``, ``flexlora status``, SuperNodes), the run as
``flwr ls`` shows it, and the processes left over (must be none: every process of the scenario's
sessions, and every process whose ``FLWR_HOME`` lies in the scenario's folder, after it stopped). The campaign is CPU-heavy and
resumable: each ``--scenario`` writes its own JSON under ``--work``; ``--table`` gathers them into
benchmarks/results/flower_faults.json and .md.

    python benchmarks/flower_faults.py --work /tmp/ff --scenario baseline   # one scenario (1-3 min)
    python benchmarks/flower_faults.py --work /tmp/ff --remaining --budget 240   # the rest, in parts
    python benchmarks/flower_faults.py --work /tmp/ff --table               # the outcome table
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
SMOKE = ROOT / "configs" / "smoke.toml"
ROUNDS = 3
KILL_ROUND = 2


def overrides(rounds: int = ROUNDS) -> list[str]:
    return ["data.suite_clients=3", "federation.clients_per_round=3", "model.threads=1", f"federation.rounds={rounds}"]


GARBAGE = ["failures.garbage=0.4"]
SCENARIOS = ["baseline", "node-killed", "node-restarted", "superlink-restart", "garbage", "too-few-nodes"]
ROUND_TIMEOUT = 300.0


def _loopback():
    spec = importlib.util.spec_from_file_location("flower_loopback", ROOT / "scripts" / "flower_loopback.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LB = _loopback()


# -- small helpers ------------------------------------------------------------------------------
def kill_hard(procs, name: str) -> None:
    """SIGKILL one started process, everything under it and its session (no clean shutdown)."""
    proc = procs.procs.pop(name)
    pids = [proc.pid, *LB._descendants(proc.pid)]
    LB._signal_all(pids, signal.SIGKILL)
    LB._signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _session(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])  # state ppid pgrp session
    except (OSError, ValueError, IndexError):
        return None


def _flwr_home_under(pid: int, folder: Path) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    homes = [e.split(b"=", 1)[1].decode(errors="replace") for e in env if e.startswith(b"FLWR_HOME=")]
    return any(h == str(folder) or h.startswith(str(folder) + os.sep) for h in homes)


def leftovers(sessions: set[int], folder: Path) -> list[str]:
    """Live processes in the sessions this scenario created (each started process leads its own), and
    any other whose FLWR_HOME is in the scenario's folder (a process that left its session)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        if (_session(int(entry)) in sessions or _flwr_home_under(int(entry), folder)) and LB._alive(int(entry)):
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out.append(f"{entry}: {cmdline[:120]}")
    return out


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return recs


def wait_until(cond, timeout: float, what: str, poll: float = 0.5) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:g}s")


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def compare_final(a: Path, b: Path) -> dict:
    if not a.is_dir() or not b.is_dir():
        return {"identical": False, "note": f"missing: {[str(p.name) for p in (a, b) if not p.is_dir()]}"}
    ha, hb = file_hashes(a), file_hashes(b)
    differ = sorted(k for k in ha.keys() | hb.keys() if ha.get(k) != hb.get(k))
    return {"identical": not differ, "files": len(ha), "differing_files": differ}


def reference(work: Path, failures: bool, rounds: int) -> Path:
    """The in-process simulator on the same config and seed (cached under ``work``)."""
    out = work / ("reference-garbage" if failures else "reference") / f"rounds-{rounds}"
    if not (out / "summary.json").exists():
        from flexlora.config import load_config
        from flexlora.simulate import Simulation

        shutil.rmtree(out, ignore_errors=True)
        Simulation(load_config(SMOKE, overrides(rounds) + (GARBAGE if failures else [])), out, progress=False).run()
    return out


def node_config(cid: int, rank_type: str | None) -> str:
    """The node's identity and ranks; without a rank type the run config's distribution gives it
    (as in Flower's simulation engine)."""
    return f'partition-id={cid}' + (f' rank-type="{rank_type}"' if rank_type else "")


def received(log: str, rnd: int) -> bool:
    """Whether a SuperNode's log shows round ``rnd``'s train message received."""
    in_round = receiving = False
    for line in log.splitlines():
        if "[RUN " in line and "ROUND " in line:
            in_round, receiving = f"ROUND {rnd}]" in line, False
        elif in_round and "Receiving: train message" in line:
            receiving = True
        elif in_round and receiving and "Received successfully" in line:
            return True
    return False


# -- one scenario ---------------------------------------------------------------------------------
class Deployment:
    """A SuperLink and three SuperNodes in ``work``, with a supervisor that restarts exited nodes."""

    def __init__(self, work: Path, types: dict[int, str | None]) -> None:
        self.work, self.types = work, types
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = LB.Processes(work / "logs")
        self.sessions: set[int] = set()
        self.starts: dict[str, int] = {}
        self.port = LB.free_port()
        self.cli_env: dict[str, str] = {}

    def _track(self, name: str) -> None:
        self.sessions.add(self.procs.procs[name].pid)

    def start_superlink(self) -> None:
        n = self.starts["superlink"] = self.starts.get("superlink", 0) + 1
        cmd = [str(LB.BIN / "flower-superlink"), "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port), "--insecure"]
        link = self.procs.start("superlink" if n == 1 else f"superlink-{n}", cmd, LB.base_env(self.work / "home" / "superlink"))
        self.procs.procs["superlink"] = self.procs.procs.pop(f"superlink-{n}", link)
        self._track("superlink")
        LB.wait_for_port(self.port, link, "the SuperLink")
        self.cli_env = LB.base_env(self.work / "home" / "cli")
        (self.work / "home" / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def node_log(self, cid: int) -> str:
        """The log of the node's current instance (node0.log, node0-2.log after a restart, ...)."""
        n = self.starts.get(f"node{cid}", 1)
        return self.procs.log(f"node{cid}" if n == 1 else f"node{cid}-{n}")

    def start_node(self, cid: int) -> None:
        name = f"node{cid}"
        n = self.starts[name] = self.starts.get(name, 0) + 1
        log_name = name if n == 1 else f"{name}-{n}"
        LB.start_supernode(self.procs, self.work, log_name, self.port, node_config(cid, self.types[cid]))
        if log_name != name:
            self.procs.procs[name] = self.procs.procs.pop(log_name)
        self._track(name)

    def start(self) -> None:
        self.start_superlink()
        for cid in sorted(self.types):
            self.start_node(cid)

    def flwr_run(self, run_config: dict, tag: str) -> subprocess.Popen:
        import tomli_w

        path = self.work / f"run-config-{tag}.toml"
        path.write_text(tomli_w.dumps(run_config))
        log = open(self.work / "logs" / f"flwr-run-{tag}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([str(LB.BIN / "flwr"), "run", str(APP), "loopback", "--run-config", str(path), "--stream"],
                                env=self.cli_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.procs[f"flwr-run-{tag}"] = proc
        self.sessions.add(proc.pid)
        return proc

    def flwr_ls(self) -> list[dict]:
        r = subprocess.run([str(LB.BIN / "flwr"), "ls", "loopback", "--format", "json"], env=self.cli_env, capture_output=True, text=True, timeout=60)
        try:
            return list(json.loads(r.stdout).get("runs", []))
        except (ValueError, AttributeError):
            return [{"unparsed": (r.stdout + r.stderr)[-300:]}]

    def stop(self) -> list[str]:
        self.procs.stop()
        time.sleep(0.5)
        return leftovers(self.sessions, self.work)


def run_config(out: Path, rounds: int, min_clients: int = 1, resume: bool = False, failures: bool = False) -> dict:
    return {
        "config": str(SMOKE), "set": "; ".join(overrides(rounds) + (GARBAGE if failures else [])), "out": str(out), "resume": resume,
        "min-nodes": 3, "min-clients": min_clients, "round-retries": 1, "round-timeout": ROUND_TIMEOUT, "node-wait-timeout": 120.0,
    }


def status_cli(out: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "flexlora.cli", "status", str(out)], capture_output=True, text=True, env=env, timeout=120)
    return r.returncode, (r.stdout + r.stderr).strip()


def scenario(name: str, work: Path, rounds: int = ROUNDS, kill_round: int = KILL_ROUND, with_reference: bool = True) -> dict:
    """Run one scenario in ``work/name`` (fresh); ``with_reference=False``: no simulator run to
    compare ``final/`` with, and the nodes declare only their partition id."""
    if not 1 <= kill_round <= rounds:
        raise SystemExit(f"--kill-round must be within 1..{rounds}")
    ref = reference(work, failures=name == "garbage", rounds=rounds) if with_reference else None
    types = _types(ref) if ref else {c: None for c in range(3)}
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "run"
    dep = Deployment(folder, types)
    row: dict = {"scenario": name, "rounds": rounds, "events": [], "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.monotonic()

    def event(what: str) -> None:
        row["events"].append(f"{time.monotonic() - t0:6.1f}s {what}")

    try:
        dep.start()
        event("SuperLink and 3 SuperNodes started")
        rc = run_config(out, rounds, min_clients=3 if name == "too-few-nodes" else 1, failures=name == "garbage")
        proc = dep.flwr_run(rc, "1")
        if name in ("node-killed", "node-restarted", "superlink-restart", "too-few-nodes"):
            row["kill_round"] = kill_round
            targets = sorted(types) if name == "superlink-restart" else [0]
            wait_until(lambda: all(received(dep.node_log(c), kill_round) for c in targets) or proc.poll() is not None, 400, f"round {kill_round}'s message at the node(s)")
            if proc.poll() is not None:
                raise OSError(f"flwr run exited {proc.returncode} before round {kill_round} reached the nodes")
            event(f"round {kill_round}'s message received by node(s) {targets} (their logs)")
            time.sleep(1.0)  # the ClientApp is starting / training: mid-round
            if name == "superlink-restart":
                kill_hard(dep.procs, "superlink")
                event(f"SuperLink SIGKILLed in round {kill_round}")
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
                row["flwr_run_exit_after_superlink_kill"] = proc.poll()
                dep.procs.stop("flwr-run-1")
                time.sleep(5.0)
                dep.start_superlink()
                event("SuperLink restarted on the same port")
                # the nodes: who exited, with which code, after the SuperLink came back
                codes: dict[str, int | None] = {}
                try:
                    wait_until(lambda: all(dep.procs.procs[f"node{c}"].poll() is not None for c in types), 90, "SuperNodes exiting", poll=1.0)
                except TimeoutError:
                    pass
                for c in sorted(types):
                    codes[f"node{c}"] = dep.procs.procs[f"node{c}"].poll()
                row["supernode_exit_codes_after_superlink_restart"] = codes
                event(f"SuperNode exit codes: {codes}")
                for c in sorted(types):  # the supervisor: restart whatever exited, whatever its code
                    if dep.procs.procs[f"node{c}"].poll() is not None:
                        old = dep.procs.procs.pop(f"node{c}")
                        # and stop what it leaves behind (a ClientApp process outlives its SuperNode), as
                        # systemd's KillMode=control-group does
                        LB._signal_group(old.pid, signal.SIGKILL)
                        dep.start_node(c)
                event("exited SuperNodes restarted (supervisor)")
                proc = dep.flwr_run(run_config(out, rounds, resume=True), "2")
                event("flwr run with resume=true")
            else:
                kill_hard(dep.procs, "node0")
                event(f"node of client 0 SIGKILLed in round {kill_round}")
                if name == "node-restarted":
                    time.sleep(10.0)
                    dep.start_node(0)
                    event("node of client 0 restarted with the same command")
        proc.wait(timeout=900)
        event(f"flwr run exited {proc.returncode}")
        row["flwr_run_exit"] = proc.returncode
        row["flwr_ls"] = dep.flwr_ls()
    except (TimeoutError, subprocess.TimeoutExpired, OSError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        row["processes_left_over"] = dep.stop()
        row["seconds"] = round(time.monotonic() - t0, 1)

    recs = [r for r in metrics(out) if r["round"] > 0]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    row["status"] = summary.get("status")
    row["reason"] = summary.get("reason")
    row["last_good_round"] = summary.get("last_good_round")
    row["rounds_completed"] = len(recs)
    row["statuses"] = {r["round"]: {str(c["id"]): c["status"] for c in r["clients"]} for r in recs}
    row["drops"] = {r["round"]: r["dropped"] for r in recs if r["dropped"]}
    row["node_ids"] = {r["round"]: {cid: n["node_id"] for cid, n in r["flower"]["nodes"].items()} for r in recs if "flower" in r}
    row["round_seconds"] = {r["round"]: round(r["flower"]["round_seconds"], 1) for r in recs if "flower" in r}
    row["rejoined"] = {cid: n["rejoined"] for cid, n in summary.get("nodes", {}).items() if "rejoined" in n}
    row["status_cli"] = dict(zip(("exit", "line"), status_cli(out)))
    row["log_drop_lines"] = [line.strip()[-220:] for line in _server_log(folder).splitlines() if "left out:" in line and "flwr.flexlora:" in line]
    if ref is None:
        return row
    against = ref / "final"
    if name in ("superlink-restart",) and (work / "baseline" / "run" / "final").is_dir() and rounds == ROUNDS:
        against = work / "baseline" / "run" / "final"
    row["final_vs"] = str(against.relative_to(work))
    row["final_comparison"] = compare_final(against, out / "final")
    return row


def _types(ref: Path) -> dict[int, str | None]:
    recs = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    return {int(c["id"]): c["type"] for r in recs if r["round"] > 0 for c in r["clients"]}


def _server_log(folder: Path) -> str:
    """What the ServerApp logged (streamed to `flwr run --stream`)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted((folder / "logs").glob("flwr-run-*.log")))


# -- the table ------------------------------------------------------------------------------------
def table(work: Path) -> None:
    # no machine paths in the committed results: the working folder becomes <work>
    def anonymous(text: str) -> str:
        for path, name in ((work, "<work>"), (ROOT, "<repo>"), (Path(sys.prefix), "<venv>"), (Path(sys.base_prefix), "<python>")):
            text = text.replace(str(path), name)
        return text

    rows = [json.loads(anonymous((work / f"{s}.json").read_text())) for s in SCENARIOS if (work / f"{s}.json").exists()]
    result = {"environment": environment(), "config": {"config": "configs/smoke.toml", "overrides": overrides(), "round_timeout": ROUND_TIMEOUT}, "scenarios": rows}
    from importlib.metadata import version

    result["environment"]["versions"]["flwr"] = version("flwr")
    result["environment"]["command"] = result["environment"]["command"].replace(str(work), "<work>")
    result["environment"]["note"] = ("loadavg_at_start is the load when the table was written; each scenario's own is in its row; "
                                     "the scenarios ran under the shared CPU lock, one at a time")
    write_json(RESULTS_DIR / "flower_faults.json", result)
    lines = [
        "# Flower deployment under faults (benchmarks/flower_faults.py)",
        "",
        f"One SuperLink + 3 SuperNodes on 127.0.0.1, flower_app, configs/smoke.toml, {ROUNDS} rounds, round-timeout {ROUND_TIMEOUT:g} s; faults are SIGKILLs, "
        "1 s after the round's message reached the node(s) (read from the SuperNodes' logs). "
        f"Measured {result['environment']['date']}.",
        "",
        "| scenario | status (`flexlora status` exit) | rounds | dropped updates (round: client: reason) | final/ vs | processes left | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        drops = "; ".join(f"r{rnd}: c{cid}: {reasons[0][:90]}" for rnd, d in r.get("drops", {}).items() for cid, reasons in d.items()) or "none"
        cmp_ = r.get("final_comparison", {})
        final = ("identical" if cmp_.get("identical") else f"differs ({len(cmp_.get('differing_files', []))} of {cmp_.get('files')} files)") + f" ({r.get('final_vs')})"
        status = f"{r.get('status')} ({r.get('status_cli', {}).get('exit')})" + (f": {r['reason']}" if r.get("status") == "stopped" else "")
        lines.append(f"| {r['scenario']} | {status} | {r.get('rounds_completed')} | {drops} | {final} | {len(r.get('processes_left_over', []))} | {r.get('seconds')} |")
    lines += ["", "Events (seconds from the start of the scenario):", ""]
    for r in rows:
        lines.append(f"- {r['scenario']}: " + "; ".join(e.strip() for e in r.get("events", [])) + (f" (note: {r['note']})" if r.get("note") else ""))
    notes = sorted({r["processes_left_over_note"] for r in rows if r.get("processes_left_over_note")})
    lines += [""] + [f"Processes left over: {n}." for n in notes]
    extra = [r for r in rows if "supernode_exit_codes_after_superlink_restart" in r]
    for r in extra:
        lines += ["", f"After the SuperLink restart the SuperNodes exited with {r['supernode_exit_codes_after_superlink_restart']} (None: still running)."]
    lines.append("")
    (RESULTS_DIR / "flower_faults.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="working folder (kept: the campaign resumes from it)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, default=[])
    parser.add_argument("--remaining", action="store_true", help="every scenario without a result in --work yet, in order")
    parser.add_argument("--budget", type=float, default=float("inf"), help="start no scenario after this many seconds (resume with --remaining)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of the run (the table is for the default)")
    parser.add_argument("--kill-round", type=int, default=KILL_ROUND, help="the round in which a process is SIGKILLed")
    parser.add_argument("--no-reference", action="store_true", help="no simulator run to compare final/ with (nodes declare only their partition id)")
    parser.add_argument("--table", action="store_true", help="gather the scenarios run so far into benchmarks/results/flower_faults.{json,md}")
    args = parser.parse_args(argv)
    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = list(args.scenario) + ([s for s in SCENARIOS if not (work / f"{s}.json").exists() and s not in args.scenario] if args.remaining else [])
    t0 = time.monotonic()
    for name in names:
        if time.monotonic() - t0 > args.budget:
            print(f"budget spent: {name} and later left for the next --remaining", flush=True)
            break
        row = scenario(name, work, args.rounds, args.kill_round, with_reference=not args.no_reference)
        write_json(work / f"{name}.json", row)
        print(json.dumps(row, indent=2))
    if args.table:
        table(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
