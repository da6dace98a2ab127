"""A server that only aggregates installs only the core (torch, numpy, safetensors) and flwr: the
Strategy and ``flexlora aggregate`` work with transformers, PEFT, gguf, rouge-score and nltk
impossible to import (a fresh interpreter where importing them raises), and none of them is loaded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

TRAINING_STACK = ("transformers", "peft", "gguf", "rouge_score", "nltk", "tokenizers", "accelerate", "matplotlib", "dp_accounting")
TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on this server)", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.path.insert(0, sys.argv[2])
import os
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
from pathlib import Path
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flexlora.flower.strategy import FlexLoRAStrategy
from flexlora.flower.payloads import tensors_to_arrays
from flexlora.peft_io import peft_key, write_adapter
from flexlora.update import LoraFactors, ModuleSpec
from flower_local import LocalGrid
from flexlora.cli import main

g = torch.Generator().manual_seed(0)
MODULES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.mlp.down_proj": (10, 16)}

def state(rank, zero_b=False):
    out = {}
    for name, (d_out, d_in) in MODULES.items():
        out[peft_key(name, "A")] = torch.randn(rank, d_in, generator=g)
        out[peft_key(name, "B")] = torch.zeros(d_out, rank) if zero_b else torch.randn(d_out, rank, generator=g)
    return out

RANKS = {1: 2, 2: 4}
def client(msg, context):  # a node at its own rank, replying without a config (ranks read from the shapes)
    sd = state(RANKS[context.node_id])
    return Message(RecordDict({"arrays": tensors_to_arrays(sd), "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)

strategy = FlexLoRAStrategy("flexlora", lora_config={"r": 4, "lora_alpha": 8}, ask_new_nodes=False)
strategy.start(LocalGrid(client, {1: {}, 2: {}}), ArrayRecord(state(4, zero_b=True)), num_rounds=2, timeout=30)
assert [sorted(r["accepted"]) for r in strategy.history] == [["1", "2"], ["1", "2"]], strategy.history  # folded in reply_order (content), not node order

work = Path(sys.argv[3])
dirs = []
for i, r in enumerate((2, 6)):
    f = {n: LoraFactors(A=torch.randn(r, d_in, generator=g), B=torch.randn(d_out, r, generator=g), scale=8 / r) for n, (d_out, d_in) in MODULES.items()}
    dirs.append(str(write_adapter(work / f"client{i}", f, {n: ModuleSpec(r, 8.0) for n in MODULES})))
rc = main(["aggregate", *dirs, "--method", "flexlora", "--out", str(work / "out")])
assert rc == 0 and (work / "out").is_dir()
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_strategy_and_aggregate_run_without_the_training_stack(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(TRAINING_STACK), str(TESTS), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not loaded & set(TRAINING_STACK), f"the server side loaded {sorted(loaded & set(TRAINING_STACK))}"
    assert {"torch", "flwr", "safetensors", "flexlora"} <= loaded
