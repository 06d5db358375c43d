"""Checkpoints: what a run saves after a round, and where a run starts from.

A checkpoint holds the global model, the pickled strategy (momentum, server optimiser
moments, SCAFFOLD's control variates), Python's ``random`` state, the clients'
persistent states, the run's flat config and the configs given to the strategy's
``start()`` as the strategy left them. A resume reloads all of it, so resumed equals
uninterrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from fedimb.client import client_half, experiment_record
from fedimb.config import Config, ConfigError
from fedimb.results import DamagedFile, RunRecorder, atomic_write_bytes
from fedimb.server.client_state import SavedStates
from fedimb.server.strategy import build_strategy

log = logging.getLogger(__name__)


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


def save_checkpoint(
    path: Path,
    server_round: int,
    arrays: ArrayRecord,
    strategy: Strategy,
    client_state: SavedStates,
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
            "client_state": client_state,
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


def starting_state(
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
        if client_state is None and getattr(client_half(config), "keeps_state", False):
            log.warning(  # an older checkpoint, from a Ray run: it had none
                "no client-side state in this checkpoint: strategy %r's clients restart "
                "their state from zero",
                config.strategy.name,
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
