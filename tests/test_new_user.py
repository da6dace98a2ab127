"""What a new user trips over (issue 27): the advice `aggregate` prints, the output dtype, ranks above a
layer's width, refusals before any work, resuming and extending runs, run output names, bytes under load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexlora.cli import main
from flexlora.methods import METHODS
from flexlora.peft_io import read_adapter

from tiny import make_peft_adapter

LAYER = "model.layers.0.mlp.down_proj"


def _exact(paths, weights, name=LAYER):
    """sum_k p_k s_k B_k A_k in float64, from the input files."""
    total = None
    for w, p in zip(weights, paths):
        f = read_adapter(p).modules[name]
        d = w * f.scale * f.B.double() @ f.A.double()
        total = d if total is None else total + d
    return total


def _delta(path, name=LAYER):
    f = read_adapter(path).modules[name]
    return f.scale * f.B.double() @ f.A.double()


def test_every_method_says_what_its_per_input_folders_hold():
    existing = ["flexlora", "fedavg", "hetlora", "flora", "ffa", "rank_partition", "florist", "fedex", "lora_fair", "rolora"]
    texts = [METHODS[m].shares_text for m in existing]
    assert all("shares_text" in vars(METHODS[m]) for m in existing)  # each its own words, not the default
    assert len(set(texts)) == len(texts)
    assert "B = 0" not in METHODS["fedex"].shares_text and "B = 0" in METHODS["flora"].shares_text


def test_fedex_advice_followed_literally_gives_the_exact_update(tmp_path, capsys):
    """FedEx's folders hold the averaged factors (not fresh B = 0 adapters); the base update it says to
    merge plus a folder's adapter is the exact weighted average of the inputs' updates."""
    ins = [make_peft_adapter(tmp_path / "in" / f"c{i}", seed=i, r=4) for i in range(3)]
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, ins), "--method", "fedex", "--out", str(out), "--weights", "1,2,5"]) == 0
    said = capsys.readouterr().out
    assert "fresh B = 0" not in said and "base_update" in said and f"merge {out / 'base_update'} into the base model" in said
    exact = _exact(ins, [1 / 8, 2 / 8, 5 / 8])
    followed = _delta(out / "base_update") + _delta(out / "c0")
    assert float((followed - exact).norm() / exact.norm()) < 1e-5
    assert float((_delta(out / "c0") - exact).norm() / exact.norm()) > 1e-2  # the folder alone is not the aggregate
    assert float((_delta(out / "global") - exact).norm() / exact.norm()) < 1e-5
    assert json.loads((out / "report.json").read_text())["shares"] == METHODS["fedex"].shares_text


def test_a_bf16_first_input_gives_a_float32_aggregate(tmp_path):
    ins = [make_peft_adapter(tmp_path / "in" / f"c{i}", seed=i, r=2 + i) for i in range(2)]
    weights = ins[0] / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, ins), "--method", "flexlora", "--out", str(out)]) == 0
    for folder in ("global", "c0", "c1"):
        assert {t.dtype for t in load_file(str(out / folder / "adapter_model.safetensors")).values()} == {torch.float32}, folder
    exact = _exact(ins, [0.5, 0.5])
    assert float((_delta(out / "global") - exact).norm() / exact.norm()) < 1e-5  # bf16 output: ~2e-3


def test_aggregate_says_when_a_rank_exceeds_its_layer_and_stays_exact(tmp_path, capsys):
    """The tiny Llama's q_proj is 32 wide: rank 48 is accepted (PEFT trains it), said before the work, exact."""
    ins = [make_peft_adapter(tmp_path / "in" / "big", seed=1, r=48), make_peft_adapter(tmp_path / "in" / "small", seed=2, r=4)]
    out = tmp_path / "out"
    assert main(["aggregate", *map(str, ins), "--method", "flexlora", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "rank 48 exceeds the width" in err and "its share keeps rank 48" in err
    assert read_adapter(out / "big").specs == read_adapter(ins[0]).specs
    name = "model.layers.0.self_attn.q_proj"
    exact = _exact(ins, [0.5, 0.5], name)
    assert float((_delta(out / "global", name) - exact).norm() / exact.norm()) < 1e-5


# -- runs: refusals before work, resume, extension, names, bytes under load ------------------------------
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")
FAST = ["federation.rounds=2", "train.max_steps=1", "eval.at_start=false", "eval.clients=1", "eval.examples_per_client=1"]


def _run(out, *extra, resume=False):
    sets = sum((["--set", s] for s in [*FAST, *extra]), [])
    return main(["run", "--config", SMOKE, "--out", str(out), "--quiet", *sets, *(["--resume"] if resume else [])])


def _final_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "final").rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished 2-round run (read-only for the tests: copy it before changing it)."""
    out = tmp_path_factory.mktemp("short") / "run"
    assert _run(out) == 0
    return out


def test_compare_refuses_its_last_method_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--config", SMOKE, "--methods", "flexlora,hetlora,fedavg", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "compare run 'fedavg'" in err and "same rank per module" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_resume_of_a_missing_folder_is_refused(tmp_path, capsys):
    assert _run(tmp_path / "nowhere", resume=True) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_run_names_its_table_and_says_what_final_holds(short_run, tmp_path, capsys):
    """Resuming a finished run says it is complete, touches nothing, and prints the run's own table."""
    import shutil

    out = tmp_path / "done"
    shutil.copytree(short_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert _run(out, resume=True) == 0
    captured = capsys.readouterr()
    assert "is a complete run (2 of 2 rounds): nothing to do" in captured.err
    assert "flexlora run smoke" in captured.out and "flexlora compare" not in captured.out
    types = sorted(p.name for p in (out / "final").iterdir() if p.name != "global")
    assert f"{', '.join(t + '/' for t in types)}: the share a client of that resource type receives" in captured.out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_extending_a_finished_run_gives_the_longer_runs_adapters(short_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "extended"
    shutil.copytree(short_run, out)
    assert _run(out, "federation.rounds=1", resume=True) == 2
    assert "rounds can only be raised" in capsys.readouterr().err
    assert _run(out, "federation.rounds=3", resume=True) == 0
    assert "extending the run from 2 to 3 rounds" in capsys.readouterr().err
    longer = tmp_path / "longer"
    assert _run(longer, "federation.rounds=3") == 0
    assert _final_bytes(out) == _final_bytes(longer)
    rounds = lambda o: [json.loads(l)["round"] for l in (o / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rounds(out) == rounds(longer) == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3


def test_clamps_are_said_before_round_1_or_refused(tmp_path, capsys):
    from flexlora.config import load_config
    from flexlora.simulate import Simulation

    cfg = load_config(SMOKE, [*FAST, "federation.clients_per_round=50", "resources.types.type4.mlp=999"])
    notes = Simulation(cfg, tmp_path / "x", progress=False).server.start_notes()
    assert any("federation.clients_per_round = 50 but only 10 clients train: every round trains all 10" in n for n in notes)
    assert any("rank 999 capped at width 64" in n and "lora.cap_at_width = false refuses them" in n for n in notes)

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q {i}", "response": "a", "category": f"c{i % 4}"}) + "\n" for i in range(24)))
    sets = ['data.kind="instruct"', f'data.path="{data}"', "data.num_clients=6", "data.heldout_clients=6"]
    assert _run(tmp_path / "held", *sets) == 2
    err = capsys.readouterr().err
    assert "data.heldout_clients = 6 holds out every one of the" in err and not (tmp_path / "held").exists()


def test_the_same_run_gives_the_same_bytes_with_the_cores_loaded(short_run, tmp_path):
    """A CPU hog on every core (up to 8) beside the run, started and killed here by PID, changes no byte."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(os.cpu_count() or 2, 8))]
    try:
        assert _run(tmp_path / "loaded") == 0
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert _final_bytes(tmp_path / "loaded") == _final_bytes(short_run)


def test_every_module_runs_at_the_thread_count_map_modules_gives_it_whichever_worker_takes_it():
    """The cause of bytes changing with the load: a worker thread's OpenMP/MKL counts started at the machine's
    default and took torch's setting only at its first parallel op, so a module's BLAS/LAPACK calls ran on one
    or on every thread depending on which worker took it and when. Read the counts each item sees."""
    import ctypes
    import glob

    from flexlora.lowrank import map_modules

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    gomp = glob.glob(os.path.join(lib, "libgomp*.so*"))
    if not gomp or torch.get_num_threads() < 2:
        pytest.skip("needs torch's bundled libgomp and at least 2 threads")
    omp = ctypes.CDLL(gomp[0])  # the instance torch loaded (same file)
    cpu = glob.glob(os.path.join(lib, "libtorch_cpu.so"))
    mkl = getattr(ctypes.CDLL(cpu[0]), "mkl_get_max_threads", None) if cpu else None
    threads = torch.get_num_threads()
    items = list(range(3 * threads))
    seen = map_modules(lambda _: (omp.omp_get_max_threads(), mkl() if mkl else 1), items)
    each = threads // min(threads, len(items))
    assert seen == [(each, each if mkl else 1)] * len(items)
    assert torch.get_num_threads() == threads
