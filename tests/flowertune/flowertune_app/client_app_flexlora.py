"""The same ClientApp after adopting FlexLoRA: three calls of flexlora.flower.client."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flexlora.flower.client import answer_query, load_share, train_reply
from flowertune_app import task

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return answer_query(msg, task.lora_config(context.run_config, context.node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    model = task.get_model(context.run_config, context.node_config)
    load_share(model, msg)
    data = task.load_data(partition_id)
    loss = task.train(model, data, context.run_config, seed=100 * int(msg.content["config"]["server-round"]) + partition_id)
    return train_reply(msg, model, num_examples=len(data), metrics={"train_loss": loss})
