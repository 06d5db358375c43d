"""Which train replies a strategy may aggregate, and the accounts of those it may not.

A reply that is an error, malformed, non-finite (loss or weights) or late is left out,
logged with its client id and counted (:class:`ReplyChecks`); the run stops when too
many failed. The checks read the arrays in place: a round's replies are many.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedimb.protocol import CLASS_COUNTS_KEY
from fedimb.records import TensorArray, array_nbytes, record_of, values_view
from fedimb.results import RunRecorder, finite_or_none
from fedimb.server.errors import TooManyFailures, TrainingDiverged
from fedimb.server.nodes import client_order

log = logging.getLogger(__name__)

# A client's training loss above this counts as diverged when every client of a round is
# there (cross-entropy at chance is ln(classes); 1e6 means logits of that size).
DIVERGED_LOSS = 1e6


def round_failure(rows: list[dict[str, Any]], sent: int) -> str | None:
    """Why a whole round failed, when each of its ``sent`` clients replied and failed
    the same way or diverged; None otherwise."""
    if not rows or len(rows) < sent:
        return None
    kinds = {fault_kind(row["fault"]) if "fault" in row else None for row in rows}
    if all(
        str(row.get("fault", "")).startswith("non-finite")
        or (finite_or_none(row.get("train-loss")) or 0.0) > DIVERGED_LOSS
        for row in rows
    ):
        return f"every client's training diverged (non-finite, or a loss over {DIVERGED_LOSS:g})"
    if len(kinds) == 1 and None not in kinds:
        return f"every client failed the same way; first: {rows[0]['fault']}"
    return None


def fault_kind(reason: str) -> str:
    """A fault without the client's own details: ``error: <Type>``, ``timed out``, ..."""
    head, _, rest = reason.partition(":")
    return f"{head}:{rest.split(':')[0]}" if head == "error" else head


def reply_fault(reply: Message, client_timeout: float) -> str | None:
    """Why a train reply must not be aggregated, or None if it is sound."""
    if reply.has_error():
        return f"error: {reply.error.reason}"
    metrics = record_of(reply.content, "metrics", MetricRecord)
    if metrics is None or record_of(reply.content, "arrays", ArrayRecord) is None:
        return "malformed reply: no 'arrays' or 'metrics' record"
    loss = metrics.get("train-loss")
    if loss is not None and not math.isfinite(float(loss)):
        return f"non-finite training loss ({loss})"
    if client_timeout and float(metrics.get("train-seconds", 0.0)) > client_timeout:
        seconds = float(metrics["train-seconds"])
        return f"timed out: trained {seconds:.1f}s > client-timeout {client_timeout}s"
    for key, array in reply.content["arrays"].items():
        if isinstance(array, TensorArray) and array.known_finite:
            continue  # checked on the training device
        if not finite(array):
            return f"non-finite weights in {key!r}"
    return None


def finite(array: Array) -> bool:
    """Whether a float Array's values are all finite (other dtypes always are), read in
    place; a sum is finite only if every term is, and it is the cheaper pass."""
    values = float_view(array)
    if values is None:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum()) or np.isfinite(values).all())


def float_view(array: Array) -> np.ndarray | None:
    """The values of a float Array without deserialising it (None for other dtypes).

    A numpy-serialised Array is an ``.npy`` file: a header, then the raw C-order data,
    so the last ``size * itemsize`` bytes are the values; reading them in place is
    much cheaper than ``Array.numpy()`` (benchmarks/README.md, "reply checks").
    """
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f":
        return None
    if isinstance(array, TensorArray) or array.stype != "numpy.ndarray":
        return values_view(array)  # an in-process reply's own values; other formats
    nbytes = array_nbytes(array)
    return np.frombuffer(memoryview(array.data)[len(array.data) - nbytes :], dtype=dtype)


class ReplyChecks:
    """Sorts a round's train replies into those fit to aggregate and faults, and keeps
    the accounts: per-client rows (``clients.jsonl``), faults, the mean training loss
    and the number aggregated, by round. Past ``max-failure-fraction``, or when a whole
    round failed alike or diverged, the run stops with one line that says why."""

    def __init__(
        self,
        recorder: RunRecorder,
        *,
        max_failure_fraction: float,
        client_timeout: float,
        divergence_cause: Callable[[int], str] | None = None,
    ) -> None:
        self.recorder = recorder
        self.max_failure_fraction, self.client_timeout = max_failure_fraction, client_timeout
        self.divergence_cause = divergence_cause  # round -> the likely cause, said with it
        self.failures: dict[int, list[dict[str, Any]]] = {}
        self.train_loss: dict[int, float] = {}
        self.aggregated: dict[int, int] = {}

    def sort_out(
        self,
        server_round: int,
        messages: list[Message],
        replies: list[Message],
        partition_of: dict[int, int],
    ) -> list[Message]:
        """The replies to ``messages`` fit to aggregate, in partition order."""
        answered = {r.metadata.src_node_id for r in replies}
        faults = [
            {
                "node": m.metadata.dst_node_id,
                "partition-id": partition_of.get(m.metadata.dst_node_id),
                "reason": "no reply within the round timeout",
            }
            for m in messages
            if m.metadata.dst_node_id not in answered
        ]
        accepted: dict[int, Message] = {}  # node -> its reply, fit to aggregate
        rows = []
        for reply in replies:
            node = reply.metadata.src_node_id
            reason = reply_fault(reply, self.client_timeout)
            metrics: dict[str, Any] = {}
            if not reply.has_error():
                metrics = dict(record_of(reply.content, "metrics", MetricRecord) or {})
            metrics.setdefault("partition-id", partition_of.get(node))
            row = {"round": server_round, "node": node, **metrics}
            row.pop(CLASS_COUNTS_KEY, None)  # static: partition.json holds them once
            if reason is None:
                accepted[node] = reply
            else:
                faults.append(
                    {"node": node, "partition-id": metrics["partition-id"], "reason": reason}
                )
                row["fault"] = reason
            rows.append(row)
        for fault in faults:
            who = (
                fault["partition-id"]
                if fault["partition-id"] is not None
                else f"node {fault['node']}"
            )
            log.warning("round %d: client %s left out: %s", server_round, who, fault["reason"])
        rows.sort(key=lambda row: client_order(row["partition-id"], row["node"]))
        # In partition order, not arrival order (random under Ray): the strategy's float
        # sums then add in the same order under either engine, run after run.
        good = [accepted[row["node"]] for row in rows if "fault" not in row]
        self.recorder.add_clients(rows)
        self._account(server_round, rows, faults, len(good))
        self._stop_if_failed(server_round, rows, faults, len(messages))
        return good

    def _account(
        self, server_round: int, rows: list[dict[str, Any]], faults: list[dict], good: int
    ) -> None:
        self.failures[server_round] = faults
        self.aggregated[server_round] = good
        losses = [
            (r["train-loss"], r["num-examples"])
            for r in rows
            if "fault" not in r and "train-loss" in r
        ]
        if losses:
            total = sum(n for _, n in losses)
            self.train_loss[server_round] = sum(v * n for v, n in losses) / max(total, 1)

    def _stop_if_failed(
        self, server_round: int, rows: list[dict[str, Any]], faults: list[dict], sent: int
    ) -> None:
        whole = round_failure(rows, sent)
        if whole is not None:
            if "diverged" not in whole:
                raise TooManyFailures(f"round {server_round}: {whole}")
            cause = self.divergence_cause(server_round) if self.divergence_cause else ""
            raise TrainingDiverged(f"round {server_round}: {whole}" + (f"; {cause}" * bool(cause)))
        if faults and len(faults) > self.max_failure_fraction * sent:
            raise TooManyFailures(
                f"round {server_round}: {len(faults)} of {sent} clients failed, more than "
                f"max-failure-fraction = {self.max_failure_fraction}; first: {faults[0]['reason']}"
            )
