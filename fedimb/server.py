"""The server side of a run: strategy, evaluation, fault filtering, checkpoints.

:func:`run_server` is what the ServerApp's ``main`` calls, under any engine. It calls
the strategy's own ``start()`` (Flower's, or a user's override) and adds fedimb's duties
at seams that work whatever that ``start()`` does:

- a :class:`GuardedGrid` around the engine's Grid: replies that are errors, non-finite
  or late are dropped before the strategy sees them, logged with the client id and
  counted; past ``max-failure-fraction`` the run stops with a clear error; what the
  train messages carry (lr, a strategy's config edits) is recorded;
- the strategy's hook methods (:class:`StrategyHooks`): round numbers kept on resume,
  seeded client samples, the strategy's own metrics, its errors as one line;
- the ``evaluate_fn`` that Flower calls after every round: global balanced error on the
  test set, ``metrics.jsonl``, the progress bar and the checkpoint.

A resumed run reloads the pickled strategy (momentum, server optimiser moments, SCAFFOLD
control variates), the configs given to ``start()`` as the strategy left them, Python's
``random`` state and the clients' persistent states (SCAFFOLD's c_i, SGD momentum kept
by ``optimizer-state = "keep"``; the :class:`GuardedGrid` hands them back); each
round's client sample depends on the seed and the round only, so it is the same as in
an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import functools
import io
import logging
import math
import pickle
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

import strategies
from fedimb.client import (
    CLASS_COUNTS_KEY,
    carried_state,
    config_from_message,
    experiment_record,
    state_entries,
)
from fedimb.config import Config, ConfigError, lr_in_round
from fedimb.federation import get_federation, init_model
from fedimb.loggers import RunLoggers
from fedimb.metrics import classification_metrics
from fedimb.progress import RunProgress
from fedimb.records import TensorArray, array_nbytes, record_of, values_view
from fedimb.results import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CONFIG_HEADER,
    PARTITION_FILE,
    SUMMARY_FILE,
    DamagedFile,
    RunRecorder,
    atomic_write_bytes,
    atomic_write_text,
    finite_or_none,
    read_json,
    write_partition,
)
from fedimb.train import evaluate_counts

log = logging.getLogger(__name__)

RoundHook = Callable[[int, dict[str, Any]], None]

QUERY_TIMEOUT_FLOOR = 600.0  # seconds the nodes get to say their partition ids, at least
# Seconds between polls for replies under Ray. Flower's grid polls every 0.1 s; 0.02 s
# makes a quickstart round (20 digit clients) 0.193 s instead of 0.211 s (medians).
PULL_INTERVAL = 0.02


class TooManyFailures(RuntimeError):
    """More clients failed in a round than ``max-failure-fraction`` allows."""


class TrainingDiverged(TooManyFailures):
    """Every client of a round diverged: non-finite, or a training loss over
    ``DIVERGED_LOSS`` (a setting's fault, such as the learning rate, not the clients')."""


# A client's training loss above this counts as diverged when every client of a round is
# there (cross-entropy at chance is ln(classes); 1e6 means logits of that size).
DIVERGED_LOSS = 1e6


def round_failure(rows: list[dict[str, Any]], sent: int) -> str | None:
    """Why a whole round failed, when each of its ``sent`` clients replied and failed
    the same way or diverged; None otherwise."""
    if not rows or len(rows) < sent:
        return None
    kinds = {_fault_kind(row["fault"]) if "fault" in row else None for row in rows}
    if all(
        str(row.get("fault", "")).startswith("non-finite")
        or (finite_or_none(row.get("train-loss")) or 0.0) > DIVERGED_LOSS
        for row in rows
    ):
        return f"every client's training diverged (non-finite, or a loss over {DIVERGED_LOSS:g})"
    if len(kinds) == 1 and None not in kinds:
        return f"every client failed the same way; first: {rows[0]['fault']}"
    return None


def _fault_kind(reason: str) -> str:
    """A fault without the client's own details: ``error: <Type>``, ``timed out``, ..."""
    head, _, rest = reason.partition(":")
    return f"{head}:{rest.split(':')[0]}" if head == "error" else head


class BadGlobalModel(RuntimeError):
    """The strategy returned a global model the run cannot use."""


class NonFiniteModel(BadGlobalModel):
    """The strategy returned a global model with NaN or inf weights (from finite replies:
    the guarded grid leaves out non-finite ones)."""


def misfit(arrays: ArrayRecord, model: torch.nn.Module) -> str:
    """How ``arrays`` fails to fit ``model``'s state (names and shapes); '' if it fits."""
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    got = {k: list(a.shape) for k, a in arrays.items()}
    problems = [f"missing {k!r}" for k in own if k not in got]
    problems += [f"unexpected {k!r}" for k in got if k not in own]
    problems += [
        f"{k!r} has shape {got[k]}, the model's {own[k]}"
        for k in own
        if k in got and got[k] != own[k]
    ]
    return "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")


class SimulationEnded(RuntimeError):
    """Flower's simulation runtime stopped before the run ended."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Flower's simulation runtime stopped: {root_cause(cause)}")


class ServerStop(threading.Event):
    """Set from another thread to end the server's wait for replies (see GuardedGrid).

    :meth:`set` (Ctrl-C, SIGTERM) interrupts the run, which can be resumed;
    :meth:`fail` says that the simulation runtime itself stopped, and the run is
    recorded as failed, with that cause.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cause: BaseException | None = None

    def fail(self, cause: BaseException) -> None:
        if not self.is_set():  # an interruption stays one
            self.cause = cause
            self.set()

    def raise_reason(self) -> None:
        if self.cause is None:
            raise KeyboardInterrupt  # recorded by run_server as an interruption
        raise SimulationEnded(self.cause) from self.cause


def root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception ``exc`` was raised from."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


class StrategyFailed(RuntimeError):
    """The strategy's own code raised: one line names it, the round, the hook and the
    exception (the traceback is the exception's ``__cause__``)."""


class StartSkipsEvaluation(StrategyFailed):
    """The strategy's ``start()`` reached round 1 without calling ``evaluate_fn``."""


# Failures that end a run in one line, recorded in summary.json (the CLI prints them so).
RUN_FAILURES = (TooManyFailures, BadGlobalModel, SimulationEnded, StrategyFailed)
# fedimb's own failures: raised through a strategy's code, never reported as its errors.
FEDIMB_ERRORS = (*RUN_FAILURES, ConfigError)


def fedimb_side(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (fedimb code a strategy calls: the grid, ``evaluate_fn``) with what it
    raises marked as fedimb's, so that a strategy's start() passing it on is not blamed."""

    @functools.wraps(fn)
    def marked(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            with contextlib.suppress(AttributeError, TypeError):
                exc.fedimb_side = True
            raise

    return marked


def is_fedimbs(exc: BaseException) -> bool:
    """Whether ``exc`` is fedimb's own failure rather than the strategy's."""
    return isinstance(exc, FEDIMB_ERRORS) or getattr(exc, "fedimb_side", False)


def described(exc: BaseException) -> str:
    """``Type: message`` of ``exc``; ``Type (no message)`` when it has none."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (no message)"


def own_class(strategy: Strategy) -> type[Strategy]:
    """The strategy's own class, under the one :meth:`StrategyHooks.attach` made."""
    cls = type(strategy)
    return cls.__bases__[0] if "fedimb_hooks" in cls.__dict__ else cls


class StrategyHooks:
    """fedimb's duties at a strategy's hook methods, whatever its ``start()`` does.

    :meth:`attach` gives the strategy a subclass of its own class whose
    ``configure_*`` / ``aggregate_*`` add fedimb's part and then run the strategy's own:
    its ``start()`` (Flower's, or the user's, which may call ``super().start()``) calls
    ``self.configure_train(...)`` and so goes through them. They add:

    - round numbers shifted by ``offset`` (the checkpointed round; 0 for a fresh run), so
      a resumed run's rounds keep their numbers;
    - a seeded client sample: the grid seeds Python's ``random`` from (``seed``, round,
      stage) just before the strategy samples (see :meth:`GuardedGrid.seed_next_sample`);
    - what ``aggregate_train`` reports of its own and what ``aggregate_evaluate`` returns
      (federated evaluation), kept by round for ``metrics.jsonl``;
    - the strategy's errors as one line (:class:`StrategyFailed`);
    - a check that ``start()`` called ``evaluate_fn`` before round 1, where fedimb's
      evaluation, metrics, checkpoints and progress run.

    The subclass pickles as the strategy's own class, so checkpoints hold no trace of it.
    """

    def __init__(self, name: str, offset: int, *, seed: int) -> None:
        self.name, self.offset, self.seed = name, offset, seed
        self.federated: dict[int, MetricRecord] = {}
        self.strategy_metrics: dict[int, dict[str, float]] = {}
        self.kept_model_said = False
        self.evaluate_called = False  # set by the run's evaluate_fn
        self.round = offset  # the latest round a hook was called for

    def attach(self, strategy: Strategy) -> Strategy:
        """Route ``strategy``'s hooks through these duties (in place); return it."""
        own = own_class(strategy)
        namespace = {
            "__slots__": (),  # the same layout as its own class: __class__ can change
            "__module__": own.__module__,
            "__qualname__": own.__qualname__,
            "__reduce_ex__": _reduce_as_own_class,
            "fedimb_hooks": self,
            **{hook.__name__.removeprefix("_hooked_"): hook for hook in _HOOKS},
        }
        strategy.__class__ = type(own)(own.__name__, (own,), namespace)
        return strategy

    def failed(self, where: str, exc: Exception) -> StrategyFailed:
        """The one-line error for ``exc``, raised by the strategy's ``where``."""
        when = (
            f"in round {self.round}"
            if self.round > self.offset
            else f"before round {self.round + 1}"
        )
        return StrategyFailed(f"strategy {self.name!r} failed {when} ({where}): {described(exc)}")

    def call(self, strategy: Strategy, hook: str, local_round: int, *args: Any) -> Any:
        """The strategy's own ``hook`` for the run's round of Flower's ``local_round``."""
        self.round = local_round + self.offset
        try:
            result = getattr(own_class(strategy), hook)(strategy, self.round, *args)
            # A generator's errors would otherwise surface later, inside the grid.
            return list(result) if hook.startswith("configure") else result
        except Exception as exc:
            if is_fedimbs(exc):
                raise
            raise self.failed(hook, exc) from exc

    def seed_sample(self, grid: Grid, local_round: int, stage: str) -> None:
        """Seed the next sample from the grid the strategy was handed (if it can)."""
        if hasattr(grid, "seed_next_sample"):
            grid.seed_next_sample(f"fedimb-sample:{self.seed}:{local_round + self.offset}:{stage}")

    def check_started(self, local_round: int) -> None:
        """Refuse to run round 1 when ``start()`` skipped ``evaluate_fn(0, arrays)``."""
        if local_round == 1 and not self.evaluate_called:
            raise StartSkipsEvaluation(
                f"strategy {self.name!r}: its start() reached round {1 + self.offset} without "
                "calling evaluate_fn(0, arrays), so fedimb cannot evaluate the global model, "
                "write metrics.jsonl, checkpoint or show progress (each runs in evaluate_fn, "
                "the seam Flower's start() calls before round 1 and after each round); pass "
                "evaluate_fn on to super().start(), or call it as Strategy.start does"
            )

    def kept_model(self, arrays: ArrayRecord | None, replies: list[Message]) -> None:
        """Say once a run that the strategy kept the model although clients replied."""
        if arrays is None and replies and not self.kept_model_said:
            self.kept_model_said = True  # once a run: a strategy may do so by design
            log.warning(
                "round %d: the strategy returned no global model from %d replies, so the "
                "model stays as it was (said once)",
                self.round,
                len(replies),
            )


def _hooks(strategy: Strategy) -> StrategyHooks:
    return type(strategy).fedimb_hooks


def _hooked_configure_train(self, server_round, arrays, config, grid):
    hooks = _hooks(self)
    hooks.check_started(server_round)
    hooks.seed_sample(grid, server_round, "train")
    return hooks.call(self, "configure_train", server_round, arrays, config, grid)


def _hooked_aggregate_train(self, server_round, replies):
    hooks, replies = _hooks(self), list(replies)
    arrays, metrics = hooks.call(self, "aggregate_train", server_round, replies)
    hooks.strategy_metrics[hooks.round] = _own_metrics(metrics, replies)
    hooks.kept_model(arrays, replies)
    return arrays, metrics


def _hooked_configure_evaluate(self, server_round, arrays, config, grid):
    hooks = _hooks(self)
    hooks.seed_sample(grid, server_round, "evaluate")
    return hooks.call(self, "configure_evaluate", server_round, arrays, config, grid)


def _hooked_aggregate_evaluate(self, server_round, replies):
    hooks = _hooks(self)
    result = hooks.call(self, "aggregate_evaluate", server_round, list(replies))
    if result is not None:
        hooks.federated[hooks.round] = result
    return result


_HOOKS = (
    _hooked_configure_train,
    _hooked_aggregate_train,
    _hooked_configure_evaluate,
    _hooked_aggregate_evaluate,
)


def _reduce_as_own_class(self, protocol):
    """Pickle (checkpoints, copies) as the strategy's own class: a resumed run attaches
    its own hooks, and a pickle names no class made at run time."""
    hooked, own = type(self), own_class(self)
    self.__class__ = own  # its own class's way of pickling, whatever that is
    try:
        reduced = self.__reduce_ex__(protocol)
    finally:
        self.__class__ = hooked
    if reduced[0] is copyreg.__newobj__ and reduced[1] == (own,):
        # The default (object's) way: pickle checks that its class is the object's, so
        # the same rebuild in the way that names the class without that check.
        return (copyreg._reconstructor, (own, object, None), *reduced[2:])
    return reduced


def _own_metrics(metrics: MetricRecord | None, replies: list[Message]) -> dict[str, float]:
    """The numbers a strategy's ``aggregate_train`` reports besides its averages of the
    clients' own metrics (e.g. the norm of its update), as ``strategy_<key>`` columns."""
    clients = set()  # replies here are sound ones: each has its metrics (_reply_fault)
    for reply in replies:
        clients.update(record_of(reply.content, "metrics", MetricRecord).keys())
    return {
        "strategy_" + key.replace("-", "_"): float(value)
        for key, value in (metrics or {}).items()
        if key not in clients and isinstance(value, int | float)  # not a list
    }


def _reply_fault(reply: Message, client_timeout: float) -> str | None:
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
        if not _finite(array):
            return f"non-finite weights in {key!r}"
    return None


def _finite(array: Array) -> bool:
    """Whether a float Array's values are all finite (other dtypes always are), read in
    place; a sum is finite only if every term is, and it is the cheaper pass."""
    values = _float_view(array)
    if values is None:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum()) or np.isfinite(values).all())


def _client_order(partition_id: int | None, node_id: int) -> tuple[bool, int, int]:
    """Sort key of a round's clients: by partition, those of unknown partition last."""
    return partition_id is None, partition_id or 0, node_id


def _stated_partition(reply: Message) -> int | None:
    """The partition id a query reply states (None for an error reply)."""
    if reply.has_error():
        return None
    metrics = record_of(reply.content, "metrics", MetricRecord)
    return int(metrics["partition-id"]) if metrics and "partition-id" in metrics else None


def _float_view(array: Array) -> np.ndarray | None:
    """The values of a float Array without deserialising it (None for other dtypes).

    A numpy-serialised Array is an ``.npy`` file: a header, then the raw C-order data,
    so the last ``size * itemsize`` bytes are the values; reading them in place is ~10x
    cheaper than ``Array.numpy()`` for the small arrays of a simulated client.
    """
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f":
        return None
    if isinstance(array, TensorArray) or array.stype != "numpy.ndarray":
        return values_view(array)  # an in-process reply's own values; other formats
    nbytes = array_nbytes(array)
    return np.frombuffer(memoryview(array.data)[len(array.data) - nbytes :], dtype=dtype)


class SentConfigs:
    """What a round's train messages told the clients, for ``metrics.jsonl``.

    ``lr``: the learning rate the clients train with, as they compute it from the config
    they were sent (a strategy may change it from round to round); ``sent_<key>``: each
    numeric entry of the run's config that the strategy changed in what it sent (``-``
    and ``.`` in the key as ``_``). Where the round's clients were sent different
    values, the mean over them.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_values = {k: v for k, v in config.to_flat().items() if _is_number(v)}
        self.by_round: dict[int, dict[str, float]] = {}

    def record(self, server_round: int, messages: list[Message]) -> None:
        """Keep what ``messages`` (one round's train messages) carry."""
        values: dict[str, list[float]] = {}
        seen: dict[int, dict[str, float]] = {}  # by record: a strategy shares one, mostly
        for msg in messages:
            record = msg.content["config"]
            if id(record) not in seen:
                seen[id(record)] = self._settings(msg)
            for key, value in seen[id(record)].items():
                values.setdefault(key, []).append(value)
        self.by_round[server_round] = {k: _mean(v) for k, v in values.items()}

    def _settings(self, msg: Message) -> dict[str, float]:
        record = msg.content["config"]
        out = {
            "sent_" + key.replace("-", "_").replace(".", "_"): float(record[key])
            for key, value in self.run_values.items()
            if key in record and _is_number(record[key]) and record[key] != value
        }
        with contextlib.suppress(ConfigError, KeyError, TypeError, ValueError):
            # As the client computes it (an entry it cannot read fails it there, not here).
            out["lr"] = lr_in_round(config_from_message(msg), int(record["server-round"]))
        return out

    def row(self, server_round: int) -> dict[str, float]:
        """The round's columns; the run config's lr when no train message was read."""
        sent = self.by_round.get(server_round, {})
        return {"lr": lr_in_round(self.config, server_round), **sent}


def _mean(values: list[float]) -> float:
    """Their mean; the value itself when all are equal (a sum would round it)."""
    return values[0] if len(set(values)) == 1 else sum(values) / len(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class GuardedGrid(Grid):
    """A Grid that filters a round's train replies and records per-client metrics.

    It also makes a seeded client sample pick the same partitions in every run, under
    either engine. Flower samples with ``random.sample(grid.get_node_ids(), k)``, so
    :meth:`get_node_ids` lists the nodes in partition order (Ray's node ids are random)
    and, when told to by :meth:`seed_next_sample`, seeds ``random`` just before returning.

    And it keeps the clients' persistent state for checkpoints, under either engine:
    each train reply carries its client's state (records under ``STATE_PREFIX``), which
    is taken out before the strategy sees the reply (:meth:`client_state`); a resumed
    run hands the saved states back to the clients before its first train round
    (:meth:`restore_client_state`).

    With a ``stop`` event (Ray's engine, whose server runs in a thread of its own), it
    waits for replies in short polls and raises KeyboardInterrupt in the server's thread
    once ``stop`` is set by Ctrl-C or SIGTERM (``fedimb.ray_engine.RayInterruption``), or
    SimulationEnded when the simulation runtime stopped without the server.
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
        self.inner, self.recorder, self.stop, self.sent = inner, recorder, stop, sent
        self.divergence_cause = divergence_cause  # round -> the likely cause, said with it
        self.max_failure_fraction, self.client_timeout = max_failure_fraction, client_timeout
        self.query_timeout = query_timeout
        self.failures: dict[int, list[dict[str, Any]]] = {}
        self.train_loss: dict[int, float] = {}
        self.aggregated: dict[int, int] = {}
        # node id -> partition id: from the engine if it knows, else asked once per node
        # (train replies also carry it)
        self.partition_of: dict[int, int] = {}
        if hasattr(inner, "node_partitions"):
            self.partition_of.update(inner.node_partitions())
        self._unanswered: set[int] = set()
        self._sample_key: str | None = None
        self._state: dict[int, dict[str, ArrayRecord]] = {}  # partition -> its records
        self._to_restore: dict[int, dict[str, ArrayRecord]] = {}

    # Everything but send_and_receive is the engine's own.
    def set_run(self, run):
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    @fedimb_side
    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def seed_next_sample(self, key: str) -> None:
        """Seed Python's ``random`` with ``key`` in the next :meth:`get_node_ids` call.

        A seed set once at the start does not fix the samples: under Ray, the driver's
        code in the ServerApp's process also draws from the global ``random`` as it
        starts (56 draws in one run here), so the first sample differed from the
        in-process engine's, and between two of our Ray runs. Seeding right before
        Flower's ``random.sample``, with the round and stage in ``key``, does (and a
        resumed run draws the same samples without any saved state). Nothing runs in the
        server's thread between the two; only another thread drawing in that instant
        could change a sample (not seen).
        """
        self._sample_key = key

    @fedimb_side
    def get_node_ids(self) -> list[int]:
        """The engine's nodes in partition order (nodes that never said theirs last)."""
        nodes = list(self.inner.get_node_ids())
        unknown = [n for n in nodes if n not in self.partition_of and n not in self._unanswered]
        if unknown:
            self._ask_partitions(unknown)
        ordered = sorted(nodes, key=lambda n: (self.partition_of.get(n, math.inf), n))
        if self._sample_key is not None:
            random.seed(self._sample_key)
            self._sample_key = None
        return ordered

    def _query(self, extra: dict[int, dict[str, ArrayRecord]]) -> list[Message]:
        """One query message to each node of ``extra``, carrying its records; the replies
        (each states its node's partition id)."""
        messages = [
            Message(RecordDict({"config": ConfigRecord({}), **records}), node, MessageType.QUERY)
            for node, records in extra.items()
        ]
        return self._exchange(messages, self.query_timeout)

    def _exchange(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Push ``messages``; pull their replies until all came or ``timeout`` passed."""
        if self.stop is None:
            return list(self.inner.send_and_receive(messages, timeout=timeout))
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            if self.stop.is_set():
                self.stop.raise_reason()
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if deadline is not None and time.monotonic() >= deadline:
                break
            if pending:
                self.stop.wait(PULL_INTERVAL)
        return replies

    def _ask_partitions(self, nodes: list[int]) -> None:
        """One query message per node; its reply holds the node's partition id."""
        for reply in self._query({node: {} for node in nodes}):
            pid = _stated_partition(reply)
            if pid is not None:
                self.partition_of[reply.metadata.src_node_id] = pid
        self._unanswered.update(n for n in nodes if n not in self.partition_of)
        if self._unanswered:
            log.warning(
                "%d node(s) did not say their partition id; they are listed after the others "
                "until a train reply says it, so which clients are sampled is not reproducible",
                len(self._unanswered),
            )

    def client_state(self) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
        """The latest persistent state of every client that has one, by partition id."""
        return {
            pid: {name: record.to_torch_state_dict() for name, record in records.items()}
            for pid, records in self._state.items()
        }

    def restore_client_state(self, states: dict[int, dict[str, dict[str, torch.Tensor]]]) -> None:
        """Give the clients back what :meth:`client_state` returned, before the next
        train round (one query message to each client that has a state)."""
        self._state = {
            int(pid): {name: ArrayRecord(tensors) for name, tensors in records.items()}
            for pid, records in states.items()
        }
        self._to_restore = dict(self._state)

    def _send_restored_state(self) -> None:
        node_of = {pid: node for node, pid in self.partition_of.items()}
        replies = self._query(
            {
                node_of[pid]: state_entries(records)
                for pid, records in self._to_restore.items()
                if pid in node_of
            }
        )
        restored = {_stated_partition(reply) for reply in replies}
        lost = sorted(set(self._to_restore) - restored)
        self._to_restore = {}
        if lost:
            log.warning(
                "the saved state of %d client(s) could not be handed back (partitions %s); "
                "they restart without it (SCAFFOLD: c_i = 0; kept momentum: zero)",
                len(lost),
                ", ".join(map(str, lost[:10])) + (" ..." if len(lost) > 10 else ""),
            )

    def _keep_state(self, reply: Message, pid: int | None) -> None:
        """Take the client's state out of its reply (a strategy expects none there)."""
        if reply.has_error():
            return
        records = carried_state(reply.content)
        for key in state_entries(records):
            del reply.content[key]
        if records and pid is not None:
            self._state[pid] = records

    @fedimb_side
    def push_messages(self, messages):
        return self.inner.push_messages(messages)

    @fedimb_side
    def pull_messages(self, message_ids):
        return self.inner.pull_messages(message_ids)

    @fedimb_side
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send a round's messages; return only the train replies fit to aggregate."""
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        if is_train and self._to_restore:
            self._send_restored_state()
        if is_train and self.sent is not None:
            self.sent.record(int(messages[0].content["config"]["server-round"]), messages)
        replies = self._exchange(messages, timeout)
        if not is_train:
            return replies
        server_round = int(messages[0].content["config"]["server-round"])
        answered = {r.metadata.src_node_id for r in replies}
        faults = [
            {
                "node": m.metadata.dst_node_id,
                "partition-id": self.partition_of.get(m.metadata.dst_node_id),
                "reason": "no reply within the round timeout",
            }
            for m in messages
            if m.metadata.dst_node_id not in answered
        ]
        accepted: dict[int, Message] = {}  # node -> its reply, fit to aggregate
        rows = []
        for reply in replies:
            node = reply.metadata.src_node_id
            reason = _reply_fault(reply, self.client_timeout)
            metrics: dict[str, Any] = {}
            if not reply.has_error():
                metrics = dict(record_of(reply.content, "metrics", MetricRecord) or {})
            if "partition-id" in metrics:
                self.partition_of[node] = int(metrics["partition-id"])
            metrics.setdefault("partition-id", self.partition_of.get(node))
            self._keep_state(reply, metrics["partition-id"])
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
        rows.sort(key=lambda row: _client_order(row["partition-id"], row["node"]))
        # In partition order, not arrival order (random under Ray): the strategy's float
        # sums then add in the same order under either engine, run after run.
        good = [accepted[row["node"]] for row in rows if "fault" not in row]
        self.recorder.add_clients(rows)
        self.failures[server_round] = faults
        self.aggregated[server_round] = len(good)
        losses = [
            (r["train-loss"], r["num-examples"])
            for r in rows
            if "fault" not in r and "train-loss" in r
        ]
        if losses:
            total = sum(n for _, n in losses)
            self.train_loss[server_round] = sum(v * n for v, n in losses) / max(total, 1)
        whole = round_failure(rows, len(messages))
        if whole is not None:
            if "diverged" not in whole:
                raise TooManyFailures(f"round {server_round}: {whole}")
            cause = self.divergence_cause(server_round) if self.divergence_cause else ""
            raise TrainingDiverged(f"round {server_round}: {whole}" + (f"; {cause}" * bool(cause)))
        if faults and len(faults) > self.max_failure_fraction * len(messages):
            raise TooManyFailures(
                f"round {server_round}: {len(faults)} of {len(messages)} clients failed, more than "
                f"max-failure-fraction = {self.max_failure_fraction}; first: {faults[0]['reason']}"
            )
        return good


# Strategy parameters that scale the server's step: a large one sends the clients a global
# model they cannot train from.
SERVER_STEP_KEYS = ("server-learning-rate", "eta")


def _server_step(config: Config) -> str:
    """The server step keys the config sets, as ``strategy.eta = 10`` ('' if none)."""
    server = {k: v for k, v in config.strategy.params.items() if k in SERVER_STEP_KEYS}
    return ", ".join(f"strategy.{k} = {v:g}" for k, v in server.items())


def divergence_cause(config: Config, server_round: int) -> str:
    """The likely cause of a round in which every client diverged, in config words: a
    server step set in the config (after round 1), else the clients' learning rate."""
    lr = f"the clients' learning rate (lr = {lr_in_round(config, server_round):g} in this round)"
    named = _server_step(config)
    if named and server_round > 1:  # round 1 starts from the initial model
        return f"likely cause: the server's step ({named}), which made their start model, or {lr}"
    return f"likely cause: {lr} is too high; lower lr"


def build_strategy(config: Config, param_keys: list[str]) -> Strategy:
    """The configured strategy, sampling ``fraction-train`` of the clients each round.

    A strategy that takes ``param_keys`` (SCAFFOLD) and was not given them gets the
    model's parameter names: our clients send a control delta for parameters only, not
    for float buffers such as BatchNorm's running statistics.
    """
    kwargs = config.strategy_kwargs()
    if "param_keys" in strategies.strategy_params(config.strategy.name):
        kwargs.setdefault("param_keys", param_keys)
    return strategies.make_strategy(config.strategy.name, **kwargs)


def save_checkpoint(
    path: Path,
    server_round: int,
    arrays: ArrayRecord,
    strategy: Strategy,
    grid: GuardedGrid,
    config: Config | None = None,
    start_configs: tuple[ConfigRecord, ConfigRecord] | None = None,
) -> None:
    """Global model, strategy, Python's ``random`` state and the clients' persistent
    states after ``server_round``, atomically; the run's flat config, which a resume
    compares with its config.toml (:func:`checkpoint_config`); and the train and evaluate
    configs given to ``start()``, as a strategy that edits them in place left them."""
    buffer = io.BytesIO()
    train_config, evaluate_config = start_configs or (None, None)
    torch.save(
        {
            "round": server_round,
            "config": config.to_flat() if config is not None else None,
            "state_dict": arrays.to_torch_state_dict(),
            "strategy": pickle.dumps(strategy),
            "random_state": random.getstate(),
            "client_state": grid.client_state(),
            "train_config": dict(train_config) if train_config is not None else None,
            "evaluate_config": dict(evaluate_config) if evaluate_config is not None else None,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``DamagedFile`` if it cannot)."""
    with _checkpoint_errors(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["strategy"] = pickle.loads(state["strategy"])
        return state


def checkpoint_round(path: Path) -> int:
    """The round a checkpoint was saved after, without reading its tensors (memory-mapped)."""
    with _checkpoint_errors(path):
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["round"])


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The flat config a checkpoint was saved under (None for one from before fedimb
    saved it), without reading its tensors."""
    with _checkpoint_errors(path):
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("config")


@contextlib.contextmanager
def _checkpoint_errors(path: Path) -> Iterator[None]:
    """A checkpoint cut short or not fedimb's, as one line that says what to do."""
    try:
        yield
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedFile(
            f"{path} is damaged ({reason}): delete it to start the run over from round 0 "
            "(with --resume), or run it again in another folder"
        ) from None


@dataclasses.dataclass
class StartingState:
    """Where a run starts: round, strategy, global model, the clients' saved states and
    the configs to give ``start()`` (a checkpoint's, on a resume)."""

    round: int
    strategy: Strategy
    arrays: ArrayRecord
    client_state: dict[int, Any] | None
    train_config: ConfigRecord
    evaluate_config: ConfigRecord


def carried_edits(
    fresh: dict[str, Any], saved: dict[str, Any] | None, saved_run: dict[str, Any] | None
) -> ConfigRecord:
    """``fresh`` (this run's config record) with the entries a strategy changed or added
    in ``saved`` (the record a checkpoint kept) against ``saved_run`` (that run's flat
    config): a strategy's in-place edits carry over; a longer num-rounds does too."""
    if saved is None:  # a checkpoint from before fedimb kept it
        return ConfigRecord(fresh)
    base = saved_run if saved_run is not None else fresh
    edits = {k: v for k, v in saved.items() if k not in base or base[k] != v}
    return ConfigRecord({**fresh, **edits})


def _starting_state(
    config: Config, model: torch.nn.Module, recorder: RunRecorder, checkpoint: Path | None
) -> StartingState:
    """Where to start from: ``checkpoint``'s state (a resume: the recorder keeps what came
    before it), or a fresh run's."""
    train_config, evaluate_config = experiment_record(config), ConfigRecord(config.to_flat())
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        start_round, arrays = int(state["round"]), ArrayRecord(state["state_dict"])
        if problem := misfit(arrays, model):  # the model's code or parameters changed since
            raise ConfigError(
                f"{checkpoint}: its model does not fit model {config.model.name!r} ({problem}); "
                "continue it with the model it began with, or start a new run"
            )
        random.setstate(state["random_state"])  # then the files: nothing above failed
        recorder.resume_from(start_round)
        client_state = state.get("client_state")
        if client_state is None and config.strategy.name == "scaffold":
            log.warning(  # an older checkpoint, from a Ray run: it had none
                "no client-side state in this checkpoint: SCAFFOLD's client control "
                "variates restart from zero"
            )
        saved_run = state.get("config")
        return StartingState(
            start_round,
            state["strategy"],
            arrays,
            client_state,
            carried_edits(dict(train_config), state.get("train_config"), saved_run),
            carried_edits(dict(evaluate_config), state.get("evaluate_config"), saved_run),
        )
    if checkpoint is not None:
        log.warning("no checkpoint in %s: starting from round 0", checkpoint.parent)
    recorder.start_fresh()
    strategy = build_strategy(config, [name for name, _ in model.named_parameters()])
    random.seed(config["seed"])  # for other draws; client samples: StrategyHooks
    arrays = ArrayRecord(model.state_dict())
    return StartingState(0, strategy, arrays, None, train_config, evaluate_config)


@contextlib.contextmanager
def _blamed_on(hooks: StrategyHooks, where: str) -> Iterator[None]:
    """Errors raised in the strategy's ``where`` (not fedimb's, which pass through it)
    as :class:`StrategyFailed`."""
    try:
        yield
    except Exception as exc:
        if is_fedimbs(exc):
            raise
        raise hooks.failed(where, exc) from exc


def run_server(
    grid: Grid,
    config: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = True,
    on_round: RoundHook | None = None,
    extra_summary: dict[str, Any] | None = None,
    stop: ServerStop | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Run the configured federated training on ``grid``; write results; return the summary.

    ``progress``: True = a bar (plain lines when not on a terminal), False = plain lines,
    None = nothing; ``label`` names the run there. ``stop``: set by another thread to end
    the run (see ServerStop).
    """
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    fed = get_federation(config)
    model = init_model(config, fed).to(fed.device)
    num_rounds = config["num-rounds"]
    recorder = RunRecorder(
        out_dir,
        seed=config["seed"],
        num_rounds=num_rounds,
        extra={"engine": config["engine"], "device": str(fed.device), **(extra_summary or {})},
    )
    checkpoint_path = out_dir / CHECKPOINT_FILE
    finished = read_json(out_dir / SUMMARY_FILE) if resume else None
    if finished and finished.get("status") == "completed":
        if finished.get("rounds_completed") == num_rounds:
            log.warning("%s completed all %d rounds: nothing to resume", out_dir, num_rounds)
            return finished  # and nothing it wrote is touched
    start = _starting_state(config, model, recorder, checkpoint_path if resume else None)
    start_round = start.round
    loggers = RunLoggers(config, out_dir, fed.dataset.classes)  # before the run's files
    atomic_write_text(out_dir / CONFIG_FILE, CONFIG_HEADER + config.to_toml())
    # Who holds what, for analysis beside clients.jsonl (the split is the config's: the same
    # on every resume).
    write_partition(out_dir / PARTITION_FILE, fed.dataset.classes, fed.counts.tolist())
    recorder.summary("running", 0.0)

    guarded = GuardedGrid(
        grid,
        recorder,
        max_failure_fraction=config["max-failure-fraction"],
        client_timeout=config["client-timeout"],
        # The query pays Ray's cold start (actors, imports): a round's limit may be too short.
        query_timeout=max(config["round-timeout"], QUERY_TIMEOUT_FLOOR),
        stop=stop,
        divergence_cause=lambda server_round: divergence_cause(config, server_round),
        sent=(sent := SentConfigs(config)),
    )
    if start.client_state:
        guarded.restore_client_state(start.client_state)
    x_test, y_test = fed.test_tensors()
    every, ckpt_every = config["eval-every"], config["checkpoint-every"]
    bar = RunProgress(
        num_rounds,
        label or f"{config.loss.name} / {config.strategy.name}",
        enabled=bool(progress),
        silent=progress is None,
    )

    hooks = StrategyHooks(config.strategy.name, start_round, seed=config["seed"])
    strategy = hooks.attach(start.strategy)
    start_configs = (start.train_config, start.evaluate_config)

    @fedimb_side
    def evaluate(local_round: int, current: ArrayRecord) -> MetricRecord | None:
        hooks.evaluate_called = True
        server_round = local_round + start_round
        if local_round == 0 and start_round > 0:
            return None  # the checkpointed model was evaluated before the interruption
        last = server_round == num_rounds
        row: dict[str, Any] = {"round": server_round}
        if server_round > 0 and (problem := misfit(current, model)):
            raise BadGlobalModel(
                f"round {server_round}: strategy {config.strategy.name!r} returned a global "
                f"model that does not fit model {config.model.name!r}: {problem}"
            )
        if server_round > 0 and not all(map(_finite, current.values())):
            raise NonFiniteModel(
                f"round {server_round}: strategy {config.strategy.name!r} made a global model "
                "with non-finite weights (NaN or inf) from finite replies; check its "
                f"parameters ({_server_step(config) or 'a server learning rate, say'})"
            )
        if server_round % every == 0 or last or server_round == 0:
            model.load_state_dict(current.to_torch_state_dict())
            correct, total = evaluate_counts(
                model,
                x_test,
                y_test,
                fed.num_classes,
                fed.dataset.to_float,
                config["eval-batch-size"],
            )
            row.update(
                classification_metrics(
                    correct,
                    total,
                    train_counts=fed.global_counts,
                    many_shot_above=config["long-tail.many-shot-above"],
                    few_shot_below=config["long-tail.few-shot-below"],
                )
            )
        if server_round > 0:
            row.update(sent.row(server_round))  # lr and what else the clients were sent
            row["train_loss"] = guarded.train_loss.get(server_round)
            row["clients"] = guarded.aggregated.get(server_round, 0)
            row["failures"] = len(guarded.failures.get(server_round, []))
            row.update(hooks.strategy_metrics.get(server_round, {}))
            federated = hooks.federated.get(server_round)
            if federated is not None and "balanced-error" in federated:
                # Summed per-class counts over the clients' own test shares.
                row["federated_balanced_error"] = federated["balanced-error"]
                row["federated_accuracy"] = federated.get("accuracy")
        row["elapsed_s"] = time.perf_counter() - t_start
        recorder.add_round(row)
        loggers.log_round(server_round, row)  # TensorBoard, W&B, ... (fedimb.loggers)
        if server_round > 0 and ckpt_every and (server_round % ckpt_every == 0 or last):
            save_checkpoint(
                checkpoint_path, server_round, current, strategy, guarded, config, start_configs
            )
            # A run killed from here on says how far it got (and can continue from).
            recorder.summary("running", time.perf_counter() - t_start)
        bar.update(server_round, row.get("balanced_error"))
        if on_round is not None:
            on_round(server_round, row)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float)})

    status, error = "failed", None
    try:
        with bar, _blamed_on(hooks, "start"):
            strategy.start(  # the strategy's own start(), if it has one
                grid=guarded,
                initial_arrays=start.arrays,
                num_rounds=num_rounds - start_round,
                timeout=config["round-timeout"],
                train_config=start.train_config,
                evaluate_config=start.evaluate_config,
                evaluate_fn=evaluate,
            )
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"  # Ctrl-C or SIGTERM: resumable from the last checkpoint
        raise
    except StrategyFailed as exc:
        error = str(exc)  # it names itself: strategy ... failed in round ...
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary = recorder.summary(status, time.perf_counter() - t_start, error)
        loggers.close()
    return summary
