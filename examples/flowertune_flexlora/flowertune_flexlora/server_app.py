"""ServerApp: FlowerTune's server with FedAvg swapped for FlexLoRAStrategy. The rest (initial LoRA
state dict, ``strategy.start``) is what a FedAvg app already has; the last lines keep the books."""

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict

from flexlora.flower.strategy import FlexLoRAStrategy
from flowertune_flexlora import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["out"]))
    out.mkdir(parents=True, exist_ok=True)
    model, _ = task.peft_model(rc)  # at the declared rank: its LoRA state dict names the modules and shapes
    strategy = FlexLoRAStrategy(
        str(rc["method"]),
        lora_config=task.lora_config(rc),
        transport=str(rc["transport"]),
        save_every=int(rc["save-every"]),
        save_dir=str(out / "adapters"),
    )
    result = strategy.start(grid, ArrayRecord(get_peft_model_state_dict(model)), num_rounds=int(rc["num-server-rounds"]))

    strategy.write_report(out / "strategy.json")  # per round and node: ranks, bytes, dropped replies
    strategy.save_adapter(out / "final")  # the global update as a PEFT adapter folder
    train_metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    summary = {"status": "completed", "rounds": int(rc["num-server-rounds"]), "train_metrics": train_metrics, "total_bytes": strategy.traffic.total_bytes}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
