"""How a run fails on the server side, each as one line that says why.

fedimb's own failures (too many clients failed, a model it cannot use, the simulation
runtime gone) are told apart from a strategy's own errors, which
:class:`StrategyFailed` names with the round and the hook they came from.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from fedimb.config import Config, ConfigError, lr_in_round


class TooManyFailures(RuntimeError):
    """More clients failed in a round than ``max-failure-fraction`` allows."""


class TrainingDiverged(TooManyFailures):
    """Every client of a round diverged: non-finite, or a training loss over
    ``DIVERGED_LOSS`` (a setting's fault, such as the learning rate, not the clients')."""


class BadGlobalModel(RuntimeError):
    """The strategy returned a global model the run cannot use."""


class NonFiniteModel(BadGlobalModel):
    """The strategy returned a global model with NaN or inf weights (from finite replies:
    the guarded grid leaves out non-finite ones)."""


class SimulationEnded(RuntimeError):
    """Flower's simulation runtime stopped before the run ended."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Flower's simulation runtime stopped: {root_cause(cause)}")


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


# Strategy parameters that scale the server's step: a large one sends the clients a global
# model they cannot train from.
SERVER_STEP_KEYS = ("server-learning-rate", "eta")


def server_step(config: Config) -> str:
    """The server step keys the config sets, as ``strategy.eta = 10`` ('' if none)."""
    server = {k: v for k, v in config.strategy.params.items() if k in SERVER_STEP_KEYS}
    return ", ".join(f"strategy.{k} = {v:g}" for k, v in server.items())


def divergence_cause(config: Config, server_round: int) -> str:
    """The likely cause of a round in which every client diverged, in config words: a
    server step set in the config (after round 1), else the clients' learning rate."""
    lr = f"the clients' learning rate (lr = {lr_in_round(config, server_round):g} in this round)"
    named = server_step(config)
    if named and server_round > 1:  # round 1 starts from the initial model
        return f"likely cause: the server's step ({named}), which made their start model, or {lr}"
    return f"likely cause: {lr} is too high; lower lr"
