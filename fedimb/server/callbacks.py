"""fedimb's duties after each round, as callbacks of the strategy's ``evaluate_fn``.

Flower's ``start()`` calls ``evaluate_fn(round, arrays)`` before round 1 and after each
round; :class:`RoundCallbacks` is that function. It starts a ``metrics.jsonl`` row for
the round and hands it to each callback in turn: check the global model, evaluate it on
the balanced test set, add the round's accounts, record the row (and the loggers), save
the checkpoint, move the progress bar, call the caller's hook.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedimb.config import Config
from fedimb.federation import Federation
from fedimb.loggers import RunLoggers
from fedimb.metrics import classification_metrics
from fedimb.progress import RunProgress
from fedimb.results import RunRecorder
from fedimb.server.checkpoint import misfit, save_checkpoint
from fedimb.server.errors import BadGlobalModel, NonFiniteModel, fedimb_side, server_step
from fedimb.server.grid import GuardedGrid
from fedimb.server.replies import finite
from fedimb.server.sent import SentConfigs
from fedimb.server.strategy import StrategyHooks
from fedimb.train import evaluate_counts

Row = dict[str, Any]
# (round, global model after it, the round's row so far): adds to the row or acts on it.
RoundCallback = Callable[[int, ArrayRecord, Row], None]


class RoundCallbacks:
    """The ``evaluate_fn`` given to ``start()``: Flower's round (counted from 1 in each
    run) shifted by ``start_round``, then each callback on the round's row.

    Round 0 of a resumed run is not evaluated again: its model is the checkpointed
    round's, so it answers with that round's recorded row (``resumed_row``), what an
    uninterrupted run's ``evaluate_fn`` returned then (a ``start()`` may read it).
    """

    def __init__(
        self,
        callbacks: Sequence[RoundCallback],
        *,
        start_round: int,
        hooks: StrategyHooks,
        resumed_row: Row | None = None,
    ) -> None:
        self.callbacks, self.start_round, self.hooks = list(callbacks), start_round, hooks
        self.resumed_row = resumed_row

    @fedimb_side
    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.hooks.evaluate_called = True
        if local_round == 0 and self.start_round > 0:
            return None if self.resumed_row is None else _numbers(self.resumed_row)
        server_round = local_round + self.start_round
        row: Row = {"round": server_round}
        for callback in self.callbacks:
            callback(server_round, arrays, row)
        return _numbers(row)


def _numbers(row: Row) -> MetricRecord:
    """A round's row as the MetricRecord ``evaluate_fn`` returns (numbers only)."""
    return MetricRecord({k: v for k, v in row.items() if isinstance(v, int | float)})


@dataclasses.dataclass
class ModelCheck:
    """Stop the run when the strategy's global model does not fit the model, or is not
    finite (made so from finite replies: the grid leaves out non-finite ones)."""

    config: Config
    model: torch.nn.Module

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Row) -> None:
        if server_round == 0:
            return
        strategy = repr(self.config.strategy.name)
        if problem := misfit(arrays, self.model):
            raise BadGlobalModel(
                f"round {server_round}: strategy {strategy} returned a global model that "
                f"does not fit model {self.config.model.name!r}: {problem}"
            )
        if not all(map(finite, arrays.values())):
            raise NonFiniteModel(
                f"round {server_round}: strategy {strategy} made a global model "
                "with non-finite weights (NaN or inf) from finite replies; check its "
                f"parameters ({server_step(self.config) or 'a server learning rate, say'})"
            )


@dataclasses.dataclass
class Evaluation:
    """Balanced error (and the rest of :func:`classification_metrics`) on the test set,
    every ``eval-every`` rounds, before round 1 and after the last."""

    config: Config
    model: torch.nn.Module
    fed: Federation

    def __post_init__(self) -> None:
        self.x_test, self.y_test = self.fed.test_tensors()

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Row) -> None:
        last = server_round == self.config["num-rounds"]
        if server_round % self.config["eval-every"] and not last:
            return
        self.model.load_state_dict(arrays.to_torch_state_dict())
        correct, total = evaluate_counts(
            self.model,
            self.x_test,
            self.y_test,
            self.fed.num_classes,
            self.fed.dataset.to_float,
            self.config["eval-batch-size"],
        )
        row.update(
            classification_metrics(
                correct,
                total,
                train_counts=self.fed.global_counts,
                many_shot_above=self.config["long-tail.many-shot-above"],
                few_shot_below=self.config["long-tail.few-shot-below"],
            )
        )


@dataclasses.dataclass
class RoundAccounts:
    """What the round did: the lr and config entries the clients were sent, their mean
    training loss, how many were aggregated or failed, what the strategy reported of its
    own, and federated evaluation's numbers when the strategy asked for it."""

    sent: SentConfigs
    grid: GuardedGrid
    hooks: StrategyHooks

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Row) -> None:
        if server_round == 0:
            return
        checks = self.grid.checks
        row.update(self.sent.row(server_round))
        row["train_loss"] = checks.train_loss.get(server_round)
        row["clients"] = checks.aggregated.get(server_round, 0)
        row["failures"] = len(checks.failures.get(server_round, []))
        row.update(self.hooks.strategy_metrics.get(server_round, {}))
        federated = self.hooks.federated.get(server_round)
        if federated is not None and "balanced-error" in federated:
            # Summed per-class counts over the clients' own test shares.
            row["federated_balanced_error"] = federated["balanced-error"]
            row["federated_accuracy"] = federated.get("accuracy")


@dataclasses.dataclass
class Recording:
    """The row, with the seconds since the start, into ``metrics.jsonl`` and the loggers
    (TensorBoard, W&B, ...: :mod:`fedimb.loggers`)."""

    recorder: RunRecorder
    loggers: RunLoggers
    t_start: float

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Row) -> None:
        row["elapsed_s"] = time.perf_counter() - self.t_start
        self.recorder.add_round(row)
        self.loggers.log_round(server_round, row)


@dataclasses.dataclass
class Checkpointing:
    """A checkpoint every ``checkpoint-every`` rounds and after the last (none when 0);
    then the summary says how far the run got, and can continue from."""

    path: Path
    config: Config
    strategy: Strategy
    grid: GuardedGrid
    start_configs: tuple[ConfigRecord, ConfigRecord]
    recorder: RunRecorder
    t_start: float

    def __call__(self, server_round: int, arrays: ArrayRecord, row: Row) -> None:
        every, last = self.config["checkpoint-every"], server_round == self.config["num-rounds"]
        if server_round == 0 or not every or (server_round % every and not last):
            return
        save_checkpoint(
            self.path,
            server_round,
            arrays,
            self.strategy,
            self.grid.client_state(),
            self.config,
            self.start_configs,
        )
        # A run killed from here on says how far it got (and can continue from).
        self.recorder.summary("running", time.perf_counter() - self.t_start)


def progress(bar: RunProgress) -> RoundCallback:
    """Move the progress bar to the round, with its balanced error."""
    return lambda server_round, arrays, row: bar.update(server_round, row.get("balanced_error"))


def caller_hook(on_round: Callable[[int, Row], None]) -> RoundCallback:
    """The caller's own ``on_round(round, row)`` (benchmarks, sweeps)."""
    return lambda server_round, arrays, row: on_round(server_round, row)
