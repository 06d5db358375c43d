"""The Grid a strategy is handed: the engine's, with its train replies guarded.

:class:`GuardedGrid` sends what the strategy sends and hands back only the train
replies fit to aggregate (:class:`~fedimb.server.replies.ReplyChecks`). Around that one
job it wires the parts that must sit between the strategy and the engine: the node
order behind a seeded sample (:mod:`~fedimb.server.nodes`), the clients' persistent
state (:mod:`~fedimb.server.client_state`), polling with a stop signal under Ray
(:mod:`~fedimb.server.polling`) and what the train messages carried
(:mod:`~fedimb.server.sent`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedimb.results import RunRecorder
from fedimb.server.client_state import ClientStates, SavedStates
from fedimb.server.errors import fedimb_side
from fedimb.server.nodes import NodeOrder
from fedimb.server.polling import ServerStop, exchange
from fedimb.server.replies import ReplyChecks
from fedimb.server.sent import SentConfigs


class GuardedGrid(Grid):
    """A Grid that filters a round's train replies before the strategy sees them.

    Its methods are fedimb's side of the strategy's code: what they raise is never
    blamed on the strategy (:func:`~fedimb.server.errors.fedimb_side`).
    """

    def __init__(
        self,
        inner: Grid,
        recorder: RunRecorder,
        *,
        max_failure_fraction: float,
        client_timeout: float,
        query_timeout: float | None = None,
        stop: ServerStop | None = None,
        divergence_cause: Callable[[int], str] | None = None,
        sent: SentConfigs | None = None,
    ) -> None:
        self.inner, self.stop, self.sent, self.query_timeout = inner, stop, sent, query_timeout
        self.checks = ReplyChecks(
            recorder,
            max_failure_fraction=max_failure_fraction,
            client_timeout=client_timeout,
            divergence_cause=divergence_cause,
        )
        known = inner.node_partitions() if hasattr(inner, "node_partitions") else None
        self.nodes = NodeOrder(known)
        self.states = ClientStates()

    @property
    def partition_of(self) -> dict[int, int]:
        """Node id -> partition id, as far as known."""
        return self.nodes.partition_of

    # The engine's own, but for what fedimb adds.
    def set_run(self, run):
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    @fedimb_side
    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    @fedimb_side
    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    @fedimb_side
    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)

    @fedimb_side
    def get_node_ids(self) -> list[int]:
        """The engine's nodes in partition order (nodes that never said theirs last)."""
        return self.nodes.ordered(list(self.inner.get_node_ids()), self._ask_partitions)

    def seed_next_sample(self, key: str) -> None:
        """Seed Python's ``random`` with ``key`` in the next :meth:`get_node_ids` call."""
        self.nodes.seed_next_sample(key)

    def client_state(self) -> SavedStates:
        """The latest persistent state of every client that has one, by partition id."""
        return self.states.saved()

    def restore_client_state(self, states: SavedStates) -> None:
        """Give the clients back what :meth:`client_state` returned, before the next
        train round (one query message to each client that has a state)."""
        self.states.restore(states)

    @fedimb_side
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send a round's messages; return only the train replies fit to aggregate."""
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        if not is_train:
            return exchange(self.inner, messages, timeout, self.stop)
        server_round = int(messages[0].content["config"]["server-round"])
        if self.states.pending:
            self.states.restored(self._query(self.states.restore_queries(self.partition_of)))
        if self.sent is not None:
            self.sent.record(server_round, messages)
        replies = exchange(self.inner, messages, timeout, self.stop)
        for reply in replies:
            self.states.take(reply, self.nodes.note(reply))
        return self.checks.sort_out(server_round, messages, replies, self.partition_of)

    def _ask_partitions(self, nodes: list[int]) -> list[Message]:
        return self._query({node: {} for node in nodes})

    def _query(self, extra: dict[int, dict[str, Any]]) -> list[Message]:
        """One query message to each node of ``extra``, carrying its records; the replies
        (each states its node's partition id)."""
        messages = [
            Message(RecordDict({"config": ConfigRecord({}), **records}), node, MessageType.QUERY)
            for node, records in extra.items()
        ]
        return exchange(self.inner, messages, self.query_timeout, self.stop)
