"""ClientApp: FlowerTune's client (PEFT model, own training loop, LoRA state dict in the reply), with
the node's own LoRA ranks from its node config. flexlora.flower.client does the FlexLoRA part: the
``query`` answer (the node's ranks, before its first round), loading a share, and the reply."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora.flower.client import answer_query, load_share, train_reply
from flowertune_flexlora import task

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This node's LoRA config (its ranks), so its very first share is at those ranks."""
    return answer_query(msg, task.lora_config(context.run_config, context.node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid = int(context.node_config["partition-id"])
    model, tokenizer = task.peft_model(rc, context.node_config)
    load_share(model, msg)
    data = task.partition(rc, pid)
    server_round = int(msg.content["config"]["server-round"])
    loss = task.train(model, tokenizer, data.train, rc, seed=int(rc["seed"]) * 1_000_003 + server_round * 7919 + pid)
    return train_reply(msg, model, num_examples=len(data.train), metrics={"train_loss": loss})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model, tokenizer = task.peft_model(context.run_config, context.node_config)
    load_share(model, msg)
    data = task.partition(context.run_config, int(context.node_config["partition-id"]))
    loss = task.eval_loss(model, tokenizer, data.eval, context.run_config)
    return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(data.eval)})}), reply_to=msg)
