"""End-to-end runs of the simulator on the tiny model, through the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexlora.cli import main
from flexlora.config import load_config
from flexlora.peft_io import read_adapter

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _strip_timings(rec):
    """What must be identical between two runs: everything but wall-clock figures."""
    if isinstance(rec, dict):
        return {k: _strip_timings(v) for k, v in rec.items() if k != "timings" and "seconds" not in k and "per_second" not in k}
    if isinstance(rec, list):
        return [_strip_timings(v) for v in rec]
    return rec


def _adapters_equal(a: Path, b: Path):
    for sub in sorted(p.name for p in (a / "final").iterdir()):
        ta = load_file(str(a / "final" / sub / "adapter_model.safetensors"))
        tb = load_file(str(b / "final" / sub / "adapter_model.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (sub, k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet"]) == 0
    return out


def test_end_to_end_run_writes_metrics_checkpoint_and_adapters(reference_run):
    out = reference_run
    recs = _metrics(out)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert "eval" in recs[0] and "eval" in recs[-1]
    r1 = recs[1]
    assert r1["bytes_up"] > 0 and r1["bytes_down"] > 0 and r1["aggregation"]["max_rel_error_vs_exact"] < 1e-6
    assert all(c["status"] == "ok" for c in r1["clients"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] > 0 and summary["rouge_l_weighted"] is not None
    assert (out / "checkpoint.pt").exists()
    assert {p.name for p in (out / "final").iterdir()} >= {"global"}


def test_the_global_adapter_is_the_final_states_own_factors(reference_run):
    """Nothing is merged into FlexLoRA's base weights: global/ is the server state's factors bit for bit,
    at the state's rank (as `flexlora aggregate` writes it), not an SVD of their dense product."""
    from flexlora.checkpoint import load_checkpoint, state_from_dict

    state = state_from_dict(load_checkpoint(reference_run)["state"])
    written = read_adapter(reference_run / "final" / "global").modules
    assert written.keys() == {n for n, gm in state.adapter.items() if gm.rank}
    for name, f in written.items():
        gm = state.adapter[name]
        assert f.scale == 1.0 and torch.equal(f.A, gm.A.float()) and torch.equal(f.B, gm.B.float()), name


def test_every_client_trains_at_its_own_ranks(reference_run):
    cfg = load_config(SMOKE)
    types = {**cfg.resources.types}
    for rec in _metrics(reference_run)[1:]:
        for c in rec["clients"]:
            t = types[c["type"]]
            assert c["ranks"]["q_proj"] == t["attention"] and c["ranks"]["down_proj"] == t["mlp"], c
    # the per-type shares written at the end have exactly those ranks, read back from the PEFT files
    for t, ranks in types.items():
        path = reference_run / "final" / t
        if path.exists():
            a = read_adapter(path)
            assert {s.rank for n, s in a.specs.items() if "self_attn" in n} == {ranks["attention"]}
            assert {s.rank for n, s in a.specs.items() if "mlp" in n} == {ranks["mlp"]}


def test_same_config_and_seed_give_the_same_numbers(reference_run, tmp_path):
    out = tmp_path / "again"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet"]) == 0
    assert _strip_timings(_metrics(out)) == _strip_timings(_metrics(reference_run))
    _adapters_equal(out, reference_run)


def test_resume_after_interruption_equals_uninterrupted_run(reference_run, tmp_path):
    """Kill a run with SIGKILL in the middle of round 2, resume it, compare with the uninterrupted run."""
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "flexlora.cli", "run", "--config", SMOKE, "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint.pt").exists():  # round 1 is saved: round 2 is under way
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.json").exists()
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--resume"]) == 0
    assert _strip_timings(_metrics(out)) == _strip_timings(_metrics(reference_run))
    _adapters_equal(out, reference_run)


def test_a_checkpoint_between_rounds_keeps_only_what_clients_can_be_served(reference_run):
    """Round 1's checkpoint holds, per module, the triplets up to the largest rank a client has (never more
    numbers than the dense update); the last round's holds the whole state that final/ was written from."""
    from flexlora.checkpoint import PREVIOUS, _read

    cfg = load_config(SMOKE)
    largest = max(max(t.values()) for t in cfg.resources.types.values())
    between, last = _read(reference_run / PREVIOUS), _read(reference_run / "checkpoint.pt")
    assert between["round"] == 1 and last["round"] == 2
    cut = 0
    for name, m in between["state"]["adapter"].items():
        d_out, d_in = m["B"].shape[0], m["A"].shape[1]
        assert m["A"].shape[0] <= min(largest, d_out, d_in)
        assert m["A"].numel() + m["B"].numel() <= d_out * d_in
        assert m["spectrum"].numel() == min(d_out, d_in, m["spectrum"].numel())  # the whole spectrum stays
        cut += m["spectrum"].numel() > m["A"].shape[0]
    assert cut > 0  # the smoke federation's stacked rank exceeds its largest client rank somewhere
    assert all(m["A"].shape[0] == m["spectrum"].numel() for m in last["state"]["adapter"].values())  # whole



def test_a_checkpoint_is_written_behind_the_next_round_and_its_metrics_line_follows_it(tmp_path):
    """CheckpointWriter: the write happens on a thread; ``then`` (the metrics line) runs only once the
    file is in place; a failed write is raised by ``wait`` and its ``then`` never runs."""
    from flexlora.checkpoint import LATEST, CheckpointWriter, _read

    seen = []
    writer = CheckpointWriter(tmp_path / "run")
    writer.start(lambda: {"round": 1, "t": torch.arange(5.0)}, then=lambda: seen.append(_read(tmp_path / "run" / LATEST)["t"].tolist()))
    writer.wait()
    assert seen == [[0.0, 1.0, 2.0, 3.0, 4.0]] and writer.last_write_seconds > 0

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bad = CheckpointWriter(blocked)
    bad.start(lambda: {"round": 1}, then=lambda: seen.append("must not run"))
    with pytest.raises(OSError):
        bad.wait()
    assert seen == [[0.0, 1.0, 2.0, 3.0, 4.0]]
    bad.wait()  # the error was handed over once


def test_a_run_that_fails_in_round_2_has_round_1_checkpointed_and_logged_and_resumes(reference_run, tmp_path, monkeypatch):
    """The loop's error propagates only after round 1's background write has landed with its metrics
    line; resuming then gives the uninterrupted run's numbers."""
    from flexlora.checkpoint import load_checkpoint
    from flexlora.simulate import Simulation

    real = Simulation.run_round

    def failing(self, rnd, state, bar):
        if rnd == 2:
            raise RuntimeError("node lost in round 2")
        return real(self, rnd, state, bar)

    out = tmp_path / "failed"
    monkeypatch.setattr(Simulation, "run_round", failing)
    with pytest.raises(RuntimeError, match="node lost"):
        Simulation(load_config(SMOKE), out, progress=False).run()
    assert [r["round"] for r in _metrics(out)] == [0, 1]
    assert load_checkpoint(out)["round"] == 1
    assert "checkpoint_write" in _metrics(out)[1]["timings"]
    monkeypatch.setattr(Simulation, "run_round", real)
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--resume"]) == 0
    assert _strip_timings(_metrics(out)) == _strip_timings(_metrics(reference_run))
    _adapters_equal(out, reference_run)

def test_corrupted_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(reference_run, out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "final")
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated by a crash
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--resume"]) == 0
    assert _strip_timings(_metrics(out)) == _strip_timings(_metrics(reference_run))
    _adapters_equal(out, reference_run)


def test_resume_accepts_a_checkpoint_from_before_a_new_option_and_names_real_changes(reference_run, tmp_path, capsys):
    """A checkpoint written before an option existed resumes when the option is at its default; a
    changed value is refused with the key named."""
    import shutil

    from flexlora.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "old"
    shutil.copytree(reference_run, out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "final")
    for f in ("checkpoint.prev.pt", "checkpoint.pt"):
        (out / f).unlink()
    ckpt = load_checkpoint(reference_run)
    ckpt.pop("_source")
    ckpt["fingerprint"] = "from-an-older-flexlora"
    del ckpt["config"]["lora"]["rslora"]
    ckpt["config"]["train"].update(hetlora_lambda=0.0, hetlora_gamma=0.99, hetlora_prune=False)  # keys that moved since (at their defaults)
    save_checkpoint(out, ckpt)
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--resume", "--set", "train.lr=0.5"]) == 2
    assert "train.lr: 0.001 -> 0.5" in capsys.readouterr().err
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--resume", "--set", "lora.rslora=true"]) == 2
    assert "lora.rslora = True is new" in capsys.readouterr().err
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", "--resume"]) == 0
    assert _strip_timings(_metrics(out)) == _strip_timings(_metrics(reference_run))
    _adapters_equal(out, reference_run)


@pytest.mark.parametrize(
    "override, message",
    [
        ("federation.roundz=3", "unknown config key federation.roundz"),
        ("federation.aggregation=\"fedprox\"", "unknown method 'fedprox'"),
        ("data.kind=\"ni\"", "data.path is required"),
        ("data.path=\"/no/such/file\"", "does not exist"),
        ("train.lr=\"fast\"", "train.lr: expected a number"),
        ("resources.distribution=\"pareto\"", "unknown 'pareto'"),
    ],
)
def test_config_errors_are_caught_before_training(tmp_path, capsys, override, message):
    overrides = [override] + (["data.kind=\"ni\""] if override.startswith("data.path") else [])
    code = main(["run", "--config", SMOKE, "--out", str(tmp_path / "x"), "--quiet", *sum((["--set", o] for o in overrides), [])])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "x").exists()


def test_rank_larger_than_the_layer_is_refused_when_not_capped(tmp_path, capsys):
    code = main(["run", "--config", SMOKE, "--out", str(tmp_path / "x"), "--quiet", "--set", "lora.cap_at_width=false", "--set", "resources.types.type4.mlp=999"])
    assert code == 2
    assert "exceeds its width" in capsys.readouterr().err


def test_fedavg_refuses_a_heterogeneous_federation_before_training(tmp_path, capsys):
    code = main(["run", "--config", SMOKE, "--out", str(tmp_path / "x"), "--quiet", "--set", "federation.aggregation=\"fedavg\""])
    assert code == 2
    assert "same rank per module" in capsys.readouterr().err
