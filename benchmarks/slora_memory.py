"""Peak memory of one SLoRA stage-1 round (sparse full-weight training) vs one LoRA round, SmolLM2-135M.

Stage 1 trains the masked entries of every target weight with AdamW, so it needs gradients and
two moment buffers for the full target weights (~106M parameters in SmolLM2), plus the server's
accumulated sparse update. Each case runs in a fresh child process (one client, the densest
resource type, 2 local steps) and reports its peak RSS.

    python benchmarks/slora_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, maxrss_mib, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(algorithm: str) -> None:
    from flexlora.config import load_config
    from flexlora.simulate import Simulation

    overrides = [
        'model.source="smollm2"', "model.threads=2", 'data.kind="suite"', "data.suite_clients=4", "data.suite_examples=16",
        f'federation.algorithm="{algorithm}"', "federation.rounds=1", "federation.slora_rounds=1", "federation.clients_per_round=1",
        'resources.custom_distribution={type4 = 1.0}', "resources.types={}", "train.max_steps=2", "train.max_length=160",
        "eval.at_start=false", "eval.clients=0", "lora.rank_scale=1.0",
    ]
    cfg = load_config(ROOT / "configs" / "smoke.toml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(cfg, Path(tmp) / "run", progress=False)
        after_load = maxrss_mib()
        sim.run()
    print(json.dumps({"algorithm": algorithm, "peak_rss_mib": maxrss_mib(), "after_model_load_mib": after_load}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    rows = []
    for algorithm in ("fedit", "slora"):
        out = subprocess.run([sys.executable, __file__, "--child", algorithm], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(out.returncode)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{algorithm:>6}: peak RSS {row['peak_rss_mib']:.0f} MiB (after model load {row['after_model_load_mib']:.0f} MiB)")
    result = {
        "benchmark": "slora_memory",
        "model": "SmolLM2-135M-Instruct fp32, LoRA targets q,k,v,o,gate,up,down; type4 client (ranks 200, capped at width)",
        "rows": rows,
        "slora_extra_mib": rows[1]["peak_rss_mib"] - rows[0]["peak_rss_mib"],
        "environment": environment(),
    }
    print(f"SLoRA stage 1 needs {result['slora_extra_mib']:.0f} MiB more than a LoRA round -> {write_json(RESULTS_DIR / 'slora_memory.json', result)}")


if __name__ == "__main__":
    main()
