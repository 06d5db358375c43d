"""Per-round logging to the tools researchers already use (TensorBoard, W&B, MLflow).

The ``loggers`` config key names them, comma-separated: a built-in (``tensorboard``) or
an import path ``"package.module:factory"``. A factory is called once per run as
``factory(run_dir, config)`` and returns a logger: an object with
``log_round(server_round, scalars)`` and, optionally, ``close()``. After each evaluated
round the server hands every logger the scalars of :func:`round_scalars` (see
docs/logging.md). A logger that raises is said once and dropped: the run goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedimb.config import Config, ConfigError
from fedimb.registry import Registry, RegistryError
from fedimb.results import TENSORBOARD_DIR

log = logging.getLogger(__name__)

# The metrics.jsonl columns every logger receives (when the round has them), by name.
SCALAR_KEYS = ("balanced_error", "accuracy", "worst_class_error", "train_loss", "lr")


class RoundLogger(Protocol):
    """What a logger factory returns."""

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None: ...


LoggerFactory = Callable[[Path, Config], RoundLogger]
LOGGERS: Registry[LoggerFactory] = Registry("logger")


def logger_names(config: Config) -> list[str]:
    """The ``loggers`` key as a list of names ('' = none)."""
    return [n.strip() for n in config["loggers"].split(",") if n.strip()]


def check_loggers(config: Config) -> None:
    """Resolve every logger now (an unknown name, a path that does not import, a missing
    package), so a run fails before it starts, not after its first round."""
    for name in logger_names(config):
        factory = _factory(name)
        check = getattr(factory, "check_available", None)
        if check is not None:
            check()


def _factory(name: str) -> LoggerFactory:
    try:
        factory = LOGGERS.get(name)
    except RegistryError as exc:
        raise ConfigError(f"loggers = {name!r}: {exc}") from None
    if not callable(factory):
        raise ConfigError(
            f"loggers = {name!r}: a {type(factory).__name__}, not a factory; give a class or "
            "function called as factory(run_dir, config) (docs/logging.md)"
        )
    return factory


def round_scalars(row: dict[str, Any], classes: Sequence[str]) -> dict[str, float]:
    """A metrics.jsonl row as logger scalars: :data:`SCALAR_KEYS` and
    ``per_class_error/<class name>``, finite numbers only."""
    scalars = {
        key: float(row[key])
        for key in SCALAR_KEYS
        if isinstance(row.get(key), int | float) and math.isfinite(row[key])
    }
    for name, value in zip(classes, row.get("per_class_error") or (), strict=False):
        if isinstance(value, int | float) and math.isfinite(value):
            scalars[f"per_class_error/{name}"] = float(value)
    return scalars


class RunLoggers:
    """The run's loggers: built at the start, fed each evaluated round, closed at the end."""

    def __init__(self, config: Config, run_dir: Path, classes: Sequence[str]) -> None:
        self.classes = [str(c) for c in classes]
        self.active: dict[str, RoundLogger] = {}
        for name in logger_names(config):
            try:
                self.active[name] = _factory(name)(Path(run_dir), config)
            except ConfigError:
                raise
            except Exception as exc:  # its own code: nothing has trained yet, so stop here
                self.close()
                raise ConfigError(
                    f"loggers = {name!r}: it raised {type(exc).__name__}: {exc}"
                ) from exc

    def log_round(self, server_round: int, row: dict[str, Any]) -> None:
        """Hand every logger the round's scalars (an evaluated round only)."""
        if not self.active or row.get("balanced_error") is None:
            return
        scalars = round_scalars(row, self.classes)
        for name, logger in list(self.active.items()):
            try:
                logger.log_round(server_round, dict(scalars))
            except Exception as exc:
                log.warning(
                    "logger %r failed in round %d (%s: %s): it is dropped, the run goes on",
                    name,
                    server_round,
                    type(exc).__name__,
                    exc,
                )
                del self.active[name]

    def close(self) -> None:
        """Close every logger that has a ``close`` (flushes TensorBoard's events)."""
        for name, logger in list(self.active.items()):
            try:
                close = getattr(logger, "close", None)
                if close is not None:
                    close()
            except Exception as exc:
                log.warning("logger %r failed to close: %s: %s", name, type(exc).__name__, exc)
        self.active = {}


# --------------------------------------------------------------------------- built-ins


def _summary_writer(log_dir: Path) -> Any:
    """torch's TensorBoard writer (needs the ``tensorboard`` package)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    """Event files in ``<run dir>/tensorboard`` (``tensorboard --logdir results``)."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        self.writer = _summary_writer(Path(run_dir) / TENSORBOARD_DIR)

    @staticmethod
    def check_available() -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "loggers = 'tensorboard' needs the tensorboard package: "
                "pip install tensorboard (or pip install 'fedimb[tensorboard]')"
            ) from None

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, server_round)

    def close(self) -> None:
        self.writer.close()
