"""An in-process Flower Grid: the real ServerApp and ClientApp, no SuperLink, no network, no Ray.

:class:`LocalGrid` implements Flower's ``Grid`` interface by handing each message to the
ClientApp of its destination node, in this process, one after the other. Every message and
reply goes through Flower's protobuf serialisation on the way (as over the wire), so payload
encoding is exercised for real. Faults can be injected per node and round: an exception in the
ClientApp (an error reply, as Flower's runtime sends one), a lost reply (a missed timeout), or a
node that dies on receiving the message (``"kill"``). A dead node (:meth:`LocalGrid.kill`) is no
longer among the node ids and every message to it is answered as the SuperLink answers one for a
node without heartbeat (Flower's own function: the SuperLink's id as sender, ``NODE_UNAVAILABLE``);
:meth:`LocalGrid.join` connects a node (a restarted SuperNode comes back under a new node id).
Messages have no TTL here: a node that sleeps past it (``failures.straggle``) sends an error reply.

Used by the fast tests and by the overhead benchmark; needs flwr (``flexlora[flower]``).
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Fault = Callable[[int, Message], "str | None"]  # (node id, message) -> None | "error" | "timeout" | "kill"


def _wire(message: Message) -> tuple[Message, int]:
    """The message as the receiver sees it after protobuf serialisation, and its size in bytes."""
    data = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(data)), len(data)


class LocalGrid(Grid):
    """Routes every message to ``client_app`` with the destination node's ``node_config``."""

    def __init__(
        self, client_app: Callable[[Message, Context], Message], node_configs: Mapping[int, Mapping[str, Any]], fault: Fault | None = None, run_id: int = 1,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            int(n): Context(run_id=run_id, node_id=int(n), node_config=dict(c), state=RecordDict(), run_config=dict(run_config or {})) for n, c in node_configs.items()
        }
        self.fault = fault
        self.dead: set[int] = set()
        # the identity Flower's runtime gives the ServerApp process (Message() reads it)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0
        self._run = None
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self.log: list[dict[str, Any]] = []  # per message: node, type, group, bytes down/up, outcome
        self._ids = itertools.count()

    # -- Grid interface ---------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dead]

    def kill(self, node: int) -> None:
        self.dead.add(int(node))

    def join(self, node: int, node_config: Mapping[str, Any]) -> None:
        run_id = next(iter(self.contexts.values())).run_id if self.contexts else 1
        self.contexts[int(node)] = Context(run_id=run_id, node_id=int(node), node_config=dict(node_config), state=RecordDict(), run_config={})

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # the SuperLink's job (as flwr's InMemoryGrid does)
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids):
            if mid in self._pending:
                self._deliver(self._pending.pop(mid))
            if mid in self._replies:
                out.append(self._replies.pop(mid))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    # -- delivery ---------------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> None:
        node = msg.metadata.dst_node_id
        received, down = _wire(msg)
        entry = {"node": node, "type": msg.metadata.message_type, "group": msg.metadata.group_id, "bytes_down": down, "bytes_up": 0}
        self.log.append(entry)
        fault = self.fault(node, msg) if self.fault else None
        if fault == "kill":
            self.kill(node)
        if node in self.dead:
            entry["outcome"] = "unavailable"
            reply = create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
            self._replies[msg.metadata.message_id] = _wire(reply)[0]
            return
        if fault == "timeout":
            entry["outcome"] = "timeout"
            return
        try:
            if fault == "error":
                raise RuntimeError(f"injected failure on node {node}")
            reply = self.client_app(received, self.contexts[node])
        except Exception as e:  # noqa: BLE001 - Flower's runtime turns any ClientApp exception into an error reply
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"), reply_to=received)
            entry["outcome"] = "error"
        else:
            entry["outcome"] = "ok"
        reply.metadata.__dict__["_message_id"] = f"reply-{next(self._ids)}"
        delivered, up = _wire(reply)
        entry["bytes_up"] = up
        self._replies[msg.metadata.message_id] = delivered
