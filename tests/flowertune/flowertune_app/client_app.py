"""The ClientApp as a FlowerTune app has it (FedAvg era): no query handler, the global loaded with
``set_peft_model_state_dict``, the trained LoRA state dict in the reply."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_app import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    model = task.get_model(context.run_config, context.node_config)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    data = task.load_data(partition_id)
    loss = task.train(model, data, context.run_config, seed=100 * int(msg.content["config"]["server-round"]) + partition_id)
    content = RecordDict({"arrays": ArrayRecord(get_peft_model_state_dict(model)), "metrics": MetricRecord({"train_loss": loss, "num-examples": len(data)})})
    return Message(content=content, reply_to=msg)
