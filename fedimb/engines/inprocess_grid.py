"""The in-process engine's Grid: a Flower ``Grid`` that runs a round's clients here.

Flower strategies talk to the ServerApp's Grid only (``get_node_ids`` to sample,
``send_and_receive`` with a whole round's messages). :class:`InProcessGrid` answers those
calls itself, with no SuperLink and no Ray: each node has its own ``Context`` (partition
id, persistent state) as under Flower's simulation engine, and a round's train messages
go to :func:`fedimb.client.train_replies` together, which trains the clients as one
vectorised step on the device and still returns one reply per client.

Outside Flower's runtime, building a ``Message`` needs the task identity that Flower's
SuperExec sets; :func:`task_identity` sets it for the duration of a run. It lives in a
private Flower module (``flwr.supercore.task_identity``): flwr is pinned to 1.42.* and
tests/test_engine.py covers it.
"""

from __future__ import annotations

import contextlib
import gc
import random
import uuid
from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedimb.client import error_reply, train_replies
from fedimb.records import array_nbytes

SERVER_NODE_ID = 1
FIRST_CLIENT_NODE_ID = 1000
COLLECT_ABOVE_BYTES = 256 * 2**20
"""Weights in a round's replies above which the next train round first frees the old
replies with a full garbage collection (see :meth:`InProcessGrid.push_messages`)."""


@contextlib.contextmanager
def frozen_start_up(*, vectorised: bool) -> Iterator[None]:
    """Keep the objects alive at the start of a run out of garbage collections while it lasts.

    A full collection visits every object Python tracks (hundreds of thousands once torch
    and Flower are loaded; benchmarks/README.md, "A frozen start-up"), paid by the
    collection before each train round with big replies (:meth:`InProcessGrid.push_messages`)
    and by Python's own oldest-generation collections. Frozen (``gc.freeze``), they are skipped:
    a collection visits only what the run made since. They are still freed by reference
    counting; ``gc.unfreeze`` at the end returns them to the collector. If the process
    already froze objects, its owner manages the collector: nothing is done.

    ``vectorised``: import ``torch._dynamo`` first, as the first ``torch.func`` gradient
    of a vectorised round would (seconds, and many objects), so that it is frozen too.
    """
    if gc.get_freeze_count():
        yield
        return
    if vectorised:
        import torch._dynamo  # noqa: F401
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def task_identity(run_id: int) -> Iterator[None]:
    """Set Flower's task identity (needed to build Messages) and restore it afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        Handles evaluate messages, and train messages when ``batched`` is False.
    num_nodes : int
        Number of simulated clients; node i has ``partition-id`` i.
    batched : bool
        Hand a round's train messages to :func:`fedimb.client.train_replies` at once.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        batched: bool = True,
        run_id: int | None = None,
    ) -> None:
        self.client_app, self.batched = client_app, batched
        self._run = Run.create_empty(run_id if run_id is not None else random.getrandbits(63))
        self.contexts = {
            FIRST_CLIENT_NODE_ID + i: Context(
                run_id=self._run.run_id,
                node_id=FIRST_CLIENT_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._reply_bytes = 0  # of the weights in the last train round's replies

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def node_partitions(self) -> dict[int, int]:
        """Each node's partition id, known here without asking the clients."""
        return {node: int(ctx.node_config["partition-id"]) for node, ctx in self.contexts.items()}

    def _call(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:
            return error_reply(msg, exc)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Run every message's client now; keep the replies until they are pulled.

        Before a train round whose predecessor's replies held more than
        ``COLLECT_ABOVE_BYTES`` of weights, a full garbage collection frees the replies
        the strategy is done with. Without it they outlive their round: each access to
        a ``RecordDict``'s ``array_records`` or ``metric_records`` (FedAvg makes several)
        builds a view that is in a reference cycle with itself and points back to the
        reply, so the reply, and its weights, wait for Python's cyclic collector, which
        may come rounds later (one round's weights of extra resident memory, every few
        rounds; on a GPU, pinned host buffers that cannot be reused).
        """
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if train and self._reply_bytes > COLLECT_ABOVE_BYTES:
            gc.collect()
        if self.batched and train:
            contexts = [self.contexts[m.metadata.dst_node_id] for m in train]
            for msg, reply in zip(train, train_replies(train, contexts), strict=True):
                self._replies[msg.metadata.message_id] = reply
        for msg in messages:
            if msg.metadata.message_id not in self._replies:
                self._replies[msg.metadata.message_id] = self._call(msg)
        if train:
            self._reply_bytes = sum(
                _weight_bytes(self._replies[m.metadata.message_id]) for m in train
            )
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push and pull at once: every client answers before this returns."""
        return self.pull_messages(self.push_messages(messages))


def _weight_bytes(reply: Message) -> int:
    """Bytes of the arrays in a reply (0 for an error reply)."""
    if reply.has_error():
        return 0
    # The content's own items, not ``array_records``: that view would itself be cyclic.
    return sum(
        array_nbytes(array)
        for record in reply.content.values()
        if isinstance(record, ArrayRecord)
        for array in record.values()
    )
