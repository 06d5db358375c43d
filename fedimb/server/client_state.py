"""The clients' persistent state, kept by the server for checkpoints, under either engine.

Each train reply carries its client's state (records under ``STATE_PREFIX``: SCAFFOLD's
c_i, SGD momentum kept by ``optimizer-state = "keep"``); :class:`ClientStates` takes it
out before the strategy sees the reply. Under Ray the clients' contexts live in Flower's
engine, out of the server's reach, so a resumed run hands the saved states back to the
clients in one query message each, before its first train round.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Message

from fedimb.protocol import carried_state, state_entries
from fedimb.server.nodes import stated_partition

log = logging.getLogger(__name__)

SavedStates = dict[int, dict[str, dict[str, torch.Tensor]]]


class ClientStates:
    """The latest state of each client, by partition id, and those still to hand back."""

    def __init__(self) -> None:
        self._state: dict[int, dict[str, ArrayRecord]] = {}  # partition -> its records
        self._to_restore: dict[int, dict[str, ArrayRecord]] = {}

    def take(self, reply: Message, pid: int | None) -> None:
        """Take the client's state out of its reply (a strategy expects none there)."""
        if reply.has_error():
            return
        records = carried_state(reply.content)
        for key in state_entries(records):
            del reply.content[key]
        if records and pid is not None:
            self._state[pid] = records

    def saved(self) -> SavedStates:
        """The latest persistent state of every client that has one, by partition id."""
        return {
            pid: {name: record.to_torch_state_dict() for name, record in records.items()}
            for pid, records in self._state.items()
        }

    def restore(self, states: SavedStates) -> None:
        """Hand back what :meth:`saved` returned, before the next train round."""
        self._state = {
            int(pid): {name: ArrayRecord(tensors) for name, tensors in records.items()}
            for pid, records in states.items()
        }
        self._to_restore = dict(self._state)

    @property
    def pending(self) -> bool:
        """Whether saved states wait to be handed back."""
        return bool(self._to_restore)

    def restore_queries(self, partition_of: dict[int, int]) -> dict[int, dict[str, ArrayRecord]]:
        """The records to send each node whose client has a state to hand back."""
        node_of = {pid: node for node, pid in partition_of.items()}
        return {
            node_of[pid]: state_entries(records)
            for pid, records in self._to_restore.items()
            if pid in node_of
        }

    def restored(self, replies: list[Message]) -> None:
        """Note the query replies; warn about clients whose state did not get back."""
        lost = sorted(set(self._to_restore) - {stated_partition(reply) for reply in replies})
        self._to_restore = {}
        if lost:
            log.warning(
                "the saved state of %d client(s) could not be handed back (partitions %s); "
                "they restart without it (SCAFFOLD: c_i = 0; kept momentum: zero)",
                len(lost),
                ", ".join(map(str, lost[:10])) + (" ..." if len(lost) > 10 else ""),
            )
