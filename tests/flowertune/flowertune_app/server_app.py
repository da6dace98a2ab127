"""The ServerApp as a FlowerTune app has it: FedAvg, and an ``evaluate_fn`` that saves the global into
the app's own PEFT model every round. ``strategy = "flexlora"`` is the one-line swap."""

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_app import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    save_path = Path(str(rc["save-path"]))
    num_rounds = int(rc["num-server-rounds"])
    init_model = task.get_model(rc)
    if rc["strategy"] == "fedavg":
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    else:
        from flexlora.flower.strategy import FlexLoRAStrategy

        strategy = FlexLoRAStrategy("flexlora", lora_config=task.lora_config(rc), fraction_train=1.0, fraction_evaluate=0.0)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_peft_model_state_dict(init_model)),
        train_config=ConfigRecord({"save_path": str(save_path)}),
        num_rounds=num_rounds,
        evaluate_fn=get_evaluate_fn(rc, save_path),
    )
    summary = {"rounds": num_rounds, "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()}}
    if rc["strategy"] != "fedavg":  # the FlexLoRA extras: the exact full-rank global and the books
        strategy.save_adapter(save_path / "final")
        strategy.write_report(save_path / "strategy.json")
    (save_path / "summary.json").write_text(json.dumps(summary))


def get_evaluate_fn(run_config, save_path: Path):
    """Save the global into the app's own PEFT model (FlowerTune's evaluate_fn)."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round != 0:
            model = task.get_model(run_config)
            set_peft_model_state_dict(model, arrays.to_torch_state_dict())
            model.save_pretrained(str(save_path / str(server_round)))
        return MetricRecord()

    return evaluate
