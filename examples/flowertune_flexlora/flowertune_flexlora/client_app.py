"""ClientApp: FlowerTune's client (PEFT model, own training loop, LoRA state dict in the reply), with
the node's own LoRA ranks from its node config and a ``query`` handler that tells the strategy
those ranks before the node's first round."""

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flexlora.flower.payloads import arrays_to_tensors, tensors_to_arrays
from flexlora.flower.strategy import lora_settings
from flowertune_flexlora import task

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's LoRA config (its ranks), so its very first share is at those ranks."""
    settings = lora_settings(task.lora_config(context.run_config, context.node_config))
    return Message(RecordDict({"config": ConfigRecord({"lora-config": json.dumps(settings)})}), reply_to=msg)


def _load(msg: Message, context: Context):
    """The PEFT model at this node's ranks with the share the server sent loaded into it."""
    model, tokenizer = task.peft_model(context.run_config, context.node_config)
    transport = str(msg.content["config"].get("transport-dtype", "float32"))
    set_peft_model_state_dict(model, arrays_to_tensors(msg.content["arrays"], transport))
    return model, tokenizer, transport


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid = int(context.node_config["partition-id"])
    model, tokenizer, transport = _load(msg, context)
    data = task.partition(rc, pid)
    server_round = int(msg.content["config"]["server-round"])
    loss = task.train(model, tokenizer, data.train, rc, seed=int(rc["seed"]) * 1_000_003 + server_round * 7919 + pid)
    content = RecordDict(
        {
            "arrays": tensors_to_arrays(get_peft_model_state_dict(model), transport),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(data.train)}),
            "config": ConfigRecord({"lora-config": json.dumps(lora_settings(model.peft_config["default"])), "transport-dtype": transport}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model, tokenizer, _ = _load(msg, context)
    data = task.partition(context.run_config, int(context.node_config["partition-id"]))
    loss = task.eval_loss(model, tokenizer, data.eval, context.run_config)
    return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(data.eval)})}), reply_to=msg)
