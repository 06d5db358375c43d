"""Which client each node is, and the order that makes a seeded sample reproducible.

Flower samples with ``random.sample(grid.get_node_ids(), k)``. Ray's node ids are random,
so :class:`NodeOrder` lists nodes by partition id and, when told to, seeds ``random``
just before the list is returned: the same seed and round pick the same partitions
under either engine, in every run and on resume.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

from flwr.app import Message, MetricRecord

from fedimb.records import record_of

log = logging.getLogger(__name__)


def stated_partition(reply: Message) -> int | None:
    """The partition id a reply states in its metrics (None for an error reply)."""
    if reply.has_error():
        return None
    metrics = record_of(reply.content, "metrics", MetricRecord)
    return int(metrics["partition-id"]) if metrics and "partition-id" in metrics else None


def client_order(partition_id: int | None, node_id: int) -> tuple[bool, int, int]:
    """Sort key of a round's clients: by partition, those of unknown partition last."""
    return partition_id is None, partition_id or 0, node_id


class NodeOrder:
    """Node id -> partition id (from the engine if it knows, else asked once per node;
    train replies also say it), and the nodes in partition order."""

    def __init__(self, known: dict[int, int] | None = None) -> None:
        self.partition_of: dict[int, int] = dict(known or {})
        self._unanswered: set[int] = set()
        self._sample_key: str | None = None

    def seed_next_sample(self, key: str) -> None:
        """Seed Python's ``random`` with ``key`` in the next :meth:`ordered` call.

        A seed set once at the start does not fix the samples: under Ray, the driver's
        code in the ServerApp's process also draws from the global ``random`` as it
        starts, so the first sample differed from the in-process engine's, and between
        two Ray runs. Seeding right before Flower's ``random.sample``, with the round and
        stage in ``key``, does (and a resumed run draws the same samples without any
        saved state). Nothing runs in the server's thread between the two.
        """
        self._sample_key = key

    def ordered(self, nodes: list[int], ask: Callable[[list[int]], list[Message]]) -> list[int]:
        """``nodes`` in partition order (nodes that never said theirs last); ``ask``
        sends a query to each node of unknown partition and returns the replies."""
        unknown = [n for n in nodes if n not in self.partition_of and n not in self._unanswered]
        if unknown:
            self._learn(unknown, ask(unknown))
        ordered = sorted(nodes, key=lambda n: (self.partition_of.get(n, math.inf), n))
        if self._sample_key is not None:
            random.seed(self._sample_key)
            self._sample_key = None
        return ordered

    def _learn(self, nodes: list[int], replies: list[Message]) -> None:
        for reply in replies:
            self.note(reply)
        self._unanswered.update(n for n in nodes if n not in self.partition_of)
        if self._unanswered:
            log.warning(
                "%d node(s) did not say their partition id; they are listed after the others "
                "until a train reply says it, so which clients are sampled is not reproducible",
                len(self._unanswered),
            )

    def note(self, reply: Message) -> int | None:
        """Learn the partition a reply states; the partition of its node, if known."""
        node, pid = reply.metadata.src_node_id, stated_partition(reply)
        if pid is not None:
            self.partition_of[node] = pid
        return self.partition_of.get(node)
