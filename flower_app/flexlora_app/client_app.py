"""ClientApp: a node reports its ranks and data size (``query``) and trains locally (``train``).

The node declares itself with ``--node-config``: ``partition-id`` (its client id, required;
Flower's simulation sets it), ``rank-type`` (a resource type of the config, e.g. "type3") or
``rank-attention`` / ``rank-mlp``, ``budget-mib`` (budget mode), ``data-path`` / ``model-source``
(where this node keeps its data and the base model). The work is in :mod:`flexlora.flower`.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flexlora.flower import handle_query, handle_train

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
