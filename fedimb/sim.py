"""The launcher: check a config, then run it on its engine (:mod:`fedimb.engines`).

Everything that can be wrong with the config or the data is found before the engine
starts (:func:`fedimb.preflight.prepare`); torch's thread count is set for the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedimb import batched
from fedimb.config import Config
from fedimb.engines import get_engine
from fedimb.preflight import check_same_defaults, prepare
from fedimb.server import RoundHook


def quiet_flower(verbose: bool = False) -> None:
    """Keep Flower's per-round INFO logs out of the user's terminal unless asked for."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)


def run_experiment(
    config: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = True,
    on_round: RoundHook | None = None,
    verbose: bool = False,
    label: str | None = None,
) -> dict[str, Any]:
    """Run ``config`` on its engine; return the summary (also in ``out_dir/summary.json``).
    ``label`` names the run in its progress lines (default: its loss and strategy)."""
    quiet_flower(verbose)
    if resume:
        check_same_defaults(out_dir)
    prepare(config)
    kwargs = {"resume": resume, "progress": progress, "on_round": on_round, "label": label}
    with torch_threads(config):
        return get_engine(config["engine"]).run(config, Path(out_dir), verbose=verbose, **kwargs)


@contextlib.contextmanager
def torch_threads(config: Config) -> Iterator[None]:
    """Run with the ``threads`` setting's number of torch threads, then restore torch's.

    This process trains the in-process engine's clients and evaluates the global model
    (Ray's actors get ``ray.client-cpus`` threads from Ray). ``threads = 0`` (auto): one
    thread on CPU for models without convolutions, else torch's default (one per core).
    Small matrix products gain nothing from a second thread and lose much when another
    process wants a core: every parallel operation then waits for a descheduled thread
    (measured in benchmarks/README.md, "torch threads").
    """
    from fedimb.client import model_for
    from fedimb.federation import get_federation

    fed = get_federation(config)
    with threads_set_to(thread_count(config["threads"], model_for(config, fed), fed.device)):
        yield


@contextlib.contextmanager
def threads_set_to(count: int) -> Iterator[None]:
    """Run with ``count`` torch threads (0: leave torch's setting), then restore it."""
    if count <= 0:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def thread_count(setting: int, model: nn.Module, device: torch.device) -> int:
    """The torch thread count for ``threads = setting`` (0: leave torch's default)."""
    if setting == 0 and device.type == "cpu" and not batched.has_convolutions(model):
        return 1
    return setting
