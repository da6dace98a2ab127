#!/usr/bin/env python3
"""A real Flower deployment on 127.0.0.1: one SuperLink, three SuperNodes of different rank types.

    python scripts/flower_loopback.py            # plain HTTP (--insecure)
    python scripts/flower_loopback.py --tls      # TLS (a CA made on the fly) + SuperNode authentication
    python scripts/flower_loopback.py --simulation  # Flower's Simulation Engine instead (needs Ray)

Runs the flexlora Flower App (``flower_app/``) for 2 rounds on the tiny test model
(configs/smoke.toml, three training clients) and checks that

* the run completed (the ServerApp's own summary.json; ``flwr run --stream`` exits 0 even when a
  run fails, so its exit code proves nothing),
* the final global adapter equals the in-process simulator's for the same config and seed,
* with ``--tls``: the SuperLink refuses a fourth SuperNode whose key was never registered.

Every process is started here, in its own session, and stopped here by its PID (and the
processes Flower started under it, found by walking /proc from those PIDs), also on failure.
Exits 0 when every check passed, 1 otherwise; ``--json`` writes the timings and checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower_app"
SMOKE = ROOT / "configs" / "smoke.toml"
# three training clients, all of them in every round: the federation is exactly the three nodes;
# one torch thread per process: three nodes and the server share two cores
OVERRIDES = ["data.suite_clients=3", "federation.clients_per_round=3", "model.threads=1"]
BIN = Path(sys.executable).parent


class LoopbackError(RuntimeError):
    pass


# -- processes ------------------------------------------------------------------------------------
class Processes:
    """Processes started by this script; ``stop()`` ends them (and their descendants) by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str | None = None, timeout: float = 15.0) -> None:
        names = [name] if name else list(self.procs)
        for n in names:
            proc = self.procs.get(n)
            if proc is None:
                continue
            pids = [proc.pid, *_descendants(proc.pid)]
            _signal_all(pids, signal.SIGTERM)
            _signal_group(proc.pid, signal.SIGTERM)  # its own session: also children orphaned by an early exit
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                proc.poll()
                time.sleep(0.1)
            still = [p for p in pids if _alive(p)]
            if still:
                _signal_all(still, signal.SIGKILL)
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.procs.pop(n, None)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(pgid: int, sig: int) -> None:
    """Signal the process group we created for one started process (its pgid is its PID)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LoopbackError(f"{what} exited with code {proc.returncode} before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise LoopbackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s")


def base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # Flower starts flower-superexec / flwr-* by name
        PYTHONUNBUFFERED="1",
        # the flexlora of this checkout, whatever the environment has installed (a worktree, an editable install elsewhere)
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]),
    )
    home.mkdir(parents=True, exist_ok=True)
    return env


# -- TLS material ---------------------------------------------------------------------------------
def make_tls(folder: Path, node_keys: int) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1/localhost, and EC P-384 SuperNode key
    pairs in OpenSSH format (what `flower-supernode` and `flwr supernode register` read)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flexlora loopback CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    files = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    files["ca"].write_bytes(ca_cert.public_bytes(pem))
    files["cert"].write_bytes(server_cert.public_bytes(pem))
    files["key"].write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for i in range(node_keys):
        k = ec.generate_private_key(ec.SECP384R1())
        files[f"node{i}"] = folder / f"node{i}"
        files[f"node{i}.pub"] = folder / f"node{i}.pub"
        files[f"node{i}"].write_bytes(k.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        files[f"node{i}.pub"].write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    for p in files.values():
        os.chmod(p, 0o600)
    return files


# -- start-up pieces ------------------------------------------------------------------------------
def start_superlink(procs: Processes, work: Path, keys: dict[str, Path] | None = None) -> tuple[int, dict[str, str]]:
    """A SuperLink on 127.0.0.1 (TLS and SuperNode authentication when ``keys`` are given), and the
    environment of a `flwr` CLI whose default SuperLink connection ("loopback") is it."""
    link_port = free_port()
    link_cmd = [str(BIN / "flower-superlink"), "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link_port)]
    if keys:
        link_cmd += ["--ssl-ca-certfile", str(keys["ca"]), "--ssl-certfile", str(keys["cert"]), "--ssl-keyfile", str(keys["key"]), "--enable-supernode-auth"]
    else:
        link_cmd += ["--insecure"]
    link = procs.start("superlink", link_cmd, base_env(work / "home" / "superlink"))
    wait_for_port(link_port, link, "the SuperLink")
    cli_env = base_env(work / "home" / "cli")
    conn = [f'address = "127.0.0.1:{link_port}"', f'root-certificates = "{keys["ca"]}"' if keys else "insecure = true"]
    (work / "home" / "cli" / "config.toml").write_text('[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n' + "\n".join(conn) + "\n")
    return link_port, cli_env


def start_simulation_superlink(procs: Processes, home: Path) -> dict[str, str]:
    """A SuperLink running Flower's Simulation Engine on 127.0.0.1 (needs Ray), started here so its
    PID is ours to stop (not flwr's detached ":local:" one), without runtime dependency installation;
    returns the environment of a `flwr` CLI whose default connection ("loopback") is it."""
    port = free_port()
    env = base_env(home)
    link = procs.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
                                     "--host", "127.0.0.1", "--port", str(port)], env)
    wait_for_port(port, link, "the simulation SuperLink")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    return env


def start_supernode(procs: Processes, work: Path, name: str, link_port: int, node_config: str, keys: dict[str, Path] | None = None, key: str | None = None) -> subprocess.Popen:
    cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config]
    cmd += ["--root-certificates", str(keys["ca"]), "--auth-supernode-private-key", str(keys[key])] if keys and key else ["--insecure"]
    return procs.start(name, cmd, base_env(work / "home" / name))


def flwr_run(app: Path, run_config: Path, cli_env: dict[str, str], timeout: float, log: Path, extra: list[str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`flwr run APP loopback --stream [extra]` (its exit code proves nothing: check the run's own artefacts)."""
    t0 = time.perf_counter()
    cmd = [str(BIN / "flwr"), "run", str(app), "loopback", "--run-config", str(run_config), "--stream", *(extra or [])]
    r = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=timeout)
    log.write_text(r.stdout + r.stderr)
    return r, time.perf_counter() - t0


def run_app(app: Path, run_config: dict, node_configs: list[str], work: Path, timeout: float) -> dict:
    """Any Flower App on a loopback deployment: an insecure SuperLink, one SuperNode per node config,
    `flwr run`; every process stopped by PID afterwards. Returns timings and the run's log path."""
    import tomli_w

    procs = Processes(work / "logs")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    report: dict = {}
    try:
        t0 = time.perf_counter()
        link_port, cli_env = start_superlink(procs, work)
        for i, nc in enumerate(node_configs):
            start_supernode(procs, work, f"supernode{i}", link_port, nc)
        report["startup_seconds"] = round(time.perf_counter() - t0, 2)
        rc_path = work / "run-config.toml"
        rc_path.write_text(tomli_w.dumps(run_config))
        r, seconds = flwr_run(app, rc_path, cli_env, timeout, work / "logs" / "flwr-run.log")
        report.update(run_seconds=round(seconds, 2), flwr_exit=r.returncode, log=str(work / "logs" / "flwr-run.log"))
    finally:
        procs.stop()
    return report


# -- the check ------------------------------------------------------------------------------------
def reference_run(out: Path, rounds: int) -> dict[int, str]:
    """The in-process simulator on the same config and seed; returns its rank type per client."""
    from flexlora.config import load_config
    from flexlora.simulate import Simulation

    cfg = load_config(SMOKE, OVERRIDES + [f"federation.rounds={rounds}"])
    sim = Simulation(cfg, out, progress=False)
    sim.run()
    return dict(sim.server.fed.types)


def compare_adapters(a: Path, b: Path) -> dict[str, float]:
    """Largest differences between two global adapters: factors (exact equality expected) and
    the dense update B @ A relative to its largest entry."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if ta.keys() != tb.keys():
        raise LoopbackError(f"the global adapters hold different tensors: {sorted(ta.keys() ^ tb.keys())[:3]}")
    factor_diff = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    rel = 0.0
    for key in ta:
        if key.endswith("lora_A.weight"):
            kb = key.replace("lora_A", "lora_B")
            da, db = ta[kb].double() @ ta[key].double(), tb[kb].double() @ tb[key].double()
            rel = max(rel, float((da - db).abs().max() / da.abs().max().clamp_min(1e-30)))
    return {"max_abs_factor_diff": factor_diff, "max_rel_update_diff": rel, "tensors": len(ta)}


def write_run_config(work: Path, rounds: int, run_timeout: float) -> tuple[Path, Path]:
    """The app's run config for the smoke federation (three clients, all of them every round);
    returns the run's output folder and the config file."""
    out = work / "flower-run"
    run_cfg = work / "run-config.toml"
    run_cfg.write_text(
        f'config = "{SMOKE}"\nset = "{"; ".join(OVERRIDES + [f"federation.rounds={rounds}"])}"\nout = "{out}"\n'
        f"min-nodes = 3\nmin-clients = 3\nround-timeout = {run_timeout}\nnode-wait-timeout = 120.0\n"
    )
    return out, run_cfg


def check_run(out: Path, types: dict[int, str], r: subprocess.CompletedProcess, work: Path, report: dict) -> None:
    """The run completed, its federation is the three clients with their types, and its global
    adapter equals the simulator's (``work/reference``); records the checks and per-round figures."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise LoopbackError(f"the run wrote no summary.json (flwr run exit {r.returncode}); see {work / 'logs' / 'flwr-run.log'}:\n{(r.stdout + r.stderr)[-3000:]}")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        raise LoopbackError(f"the run did not complete: {summary.get('status')}: {summary.get('error')}")
    report["checks"]["completed"] = True
    nodes = summary.get("nodes", {})
    if sorted(nodes) != ["0", "1", "2"] or {nodes[k]["type"] for k in nodes} != set(types.values()):
        raise LoopbackError(f"the run's federation is not the three nodes with their declared types: {nodes}")
    report["checks"]["three_nodes_with_their_types"] = True

    diff = compare_adapters(work / "reference" / "final" / "global", out / "final" / "global")
    report["adapter_diff"] = diff
    if diff["max_rel_update_diff"] > 1e-6:
        raise LoopbackError(f"the Flower run's global adapter differs from the simulator's: {diff}")
    report["checks"]["global_adapter_equals_simulator"] = True

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report["per_round"] = [
        {"round": m["round"], "seconds": round(m["flower"]["round_seconds"], 2), "bytes": {cid: {k: v for k, v in n.items() if k != "node_id"} for cid, n in m["flower"]["nodes"].items()}}
        for m in metrics if "flower" in m
    ]


def run_simulation_engine(rounds: int, work: Path, run_timeout: float) -> dict:
    """The same app and checks under Flower's Simulation Engine (needs Ray): a ``flower-superlink
    --simulation`` on 127.0.0.1 and three simulated nodes, which have only their partition id
    (their types follow from the config, as in the simulator)."""
    t_start = time.perf_counter()
    report: dict = {"mode": "simulation", "rounds": rounds, "checks": {}}
    procs = Processes(work / "logs")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        types = reference_run(work / "reference", rounds)
        report["types"] = {str(k): v for k, v in types.items()}
        t0 = time.perf_counter()
        cli_env = start_simulation_superlink(procs, work / "home" / "cli")
        report["startup_seconds"] = round(time.perf_counter() - t0, 2)
        out, run_cfg = write_run_config(work, rounds, run_timeout)
        fed = ["--federation-config", f"num-supernodes={len(types)} client-resources-num-cpus=1"]
        r, seconds = flwr_run(APP, run_cfg, cli_env, run_timeout + 180, work / "logs" / "flwr-run.log", extra=fed)
        report["run_seconds"] = round(seconds, 2)
        if "Starting Flower Simulation" not in r.stdout + r.stderr:
            raise LoopbackError(f"the run did not go through Flower's Simulation Engine; see {work / 'logs' / 'flwr-run.log'}")
        check_run(out, types, r, work, report)
        report["ok"] = True
    finally:
        procs.stop()
        report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    return report


def run_loopback(tls: bool, rounds: int, work: Path, run_timeout: float) -> dict:
    t_start = time.perf_counter()
    report: dict = {"mode": "tls" if tls else "insecure", "rounds": rounds, "checks": {}}
    procs = Processes(work / "logs")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        types = reference_run(work / "reference", rounds)
        report["reference_seconds"] = round(time.perf_counter() - t0, 2)
        if len(set(types.values())) != len(types) or len(types) != 3:
            raise LoopbackError(f"the reference federation should be 3 clients of 3 different types, got {types}")
        report["types"] = {str(k): v for k, v in types.items()}

        keys = make_tls(work / "tls", node_keys=4) if tls else {}
        t0 = time.perf_counter()
        link_port, cli_env = start_superlink(procs, work, keys or None)

        if tls:  # register the three nodes' public keys; the fourth key stays unregistered
            for i in range(3):
                r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(keys[f"node{i}.pub"]), "loopback"], env=cli_env, capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise LoopbackError(f"flwr supernode register failed for node {i}: {r.stdout}{r.stderr}")

        def supernode(name: str, pid: int, rank_type: str, key: str | None) -> subprocess.Popen:
            return start_supernode(procs, work, name, link_port, f'partition-id={pid} rank-type="{rank_type}"', keys or None, key)

        for cid, rank_type in sorted(types.items()):
            supernode(f"supernode{cid}", cid, rank_type, f"node{cid}" if tls else None)
        if tls:
            intruder = supernode("intruder", 0, "type4", "node3")
        report["startup_seconds"] = round(time.perf_counter() - t0, 2)

        out, run_cfg = write_run_config(work, rounds, run_timeout)
        r, seconds = flwr_run(APP, run_cfg, cli_env, run_timeout + 180, work / "logs" / "flwr-run.log")
        report["run_seconds"] = round(seconds, 2)
        check_run(out, types, r, work, report)

        if tls:  # the fourth node: refused by the SuperLink, gave up, and took no part in the run
            deadline = time.monotonic() + 60
            while intruder.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            link_log, own_log = procs.log("superlink"), procs.log("intruder")
            refused_by_link = "No SuperNode found with the given public key" in link_log
            gave_up = intruder.returncode not in (None, 0) and "Failed to activate SuperNode" in own_log
            report["intruder"] = {"exit_code": intruder.returncode, "refused_by_superlink": refused_by_link, "gave_up": gave_up}
            if not (refused_by_link and gave_up):
                raise LoopbackError(f"the SuperNode with an unregistered key was not refused ({report['intruder']}); its log ends with:\n{own_log[-1500:]}")
            report["checks"]["unregistered_node_refused"] = True
        report["ok"] = True
    finally:
        procs.stop()
        report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", action="store_true", help="TLS with a CA made on the fly, and SuperNode authentication")
    parser.add_argument("--simulation", action="store_true", help="Flower's Simulation Engine (Ray) instead of SuperNodes: the same checks")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="round timeout (s); the whole run gets this + 180 s")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, run folder, certificates)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flexlora-loopback-"))
    work.mkdir(parents=True, exist_ok=True)
    code = 0
    try:
        report = run_simulation_engine(args.rounds, work, args.timeout) if args.simulation else run_loopback(args.tls, args.rounds, work, args.timeout)
    except (LoopbackError, subprocess.TimeoutExpired, OSError) as e:
        report = {"mode": "simulation" if args.simulation else "tls" if args.tls else "insecure", "ok": False, "error": str(e), "work": str(work)}
        code = 1
        args.keep = True
    report["work"] = str(work)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
