"""Robustness figures: fuzzed inputs handled cleanly, and runs with 10/30/50% failing clients.

1. Fuzzing: every adapter mutation (``tests/fuzz.py``: ``ADAPTER_MUTATIONS``) and client-update mutation
   (``UPDATE_MUTATIONS``) applied many times with different seeds; an input is *handled cleanly*
   when the loader/aggregator raises its documented error (AdapterError / UpdateError) or the
   validator rejects the update with a reason — anything else (another exception, a hang, a file
   outside the output folder) counts as a failure.
2. Failing clients: the tiny-model smoke configuration with a fraction of the selected clients
   crashing, returning garbage (NaN, wrong shapes, absurd norms) or straggling past the timeout,
   equally split; does the run complete, who was dropped, and the final losses vs the failure-free run.

    python benchmarks/reliability.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import shutil
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
    from flexlora.simulate import Simulation, load_clients

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
                sim.restore_base()
            model = sim.model
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
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
    path = write_json(RESULTS_DIR / ("reliability_quick.json" if args.quick else "reliability.json"), result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
