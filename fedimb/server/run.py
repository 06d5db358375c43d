"""One run on the server side, under any engine: :func:`run_server`.

It builds (or reloads) the strategy, wraps the engine's Grid in a
:class:`~fedimb.server.grid.GuardedGrid`, hooks fedimb's duties into the strategy
(:class:`~fedimb.server.strategy.StrategyHooks`), and calls the strategy's own
``start()`` with an ``evaluate_fn`` made of round callbacks
(:mod:`~fedimb.server.callbacks`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedimb.config import Config
from fedimb.federation import get_federation, init_model
from fedimb.loggers import RunLoggers
from fedimb.progress import RunProgress
from fedimb.results import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CONFIG_HEADER,
    PARTITION_FILE,
    SUMMARY_FILE,
    RunRecorder,
    atomic_write_text,
    read_json,
    write_partition,
)
from fedimb.server import callbacks
from fedimb.server.checkpoint import starting_state
from fedimb.server.errors import StrategyFailed, divergence_cause, is_fedimbs
from fedimb.server.grid import GuardedGrid
from fedimb.server.polling import ServerStop
from fedimb.server.sent import SentConfigs
from fedimb.server.strategy import StrategyHooks

log = logging.getLogger(__name__)

RoundHook = Callable[[int, dict[str, Any]], None]

QUERY_TIMEOUT_FLOOR = 600.0  # seconds the nodes get to say their partition ids, at least


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
    start = starting_state(config, model, recorder, checkpoint_path if resume else None)
    loggers = RunLoggers(config, out_dir, fed.dataset.classes)  # before the run's files
    atomic_write_text(out_dir / CONFIG_FILE, CONFIG_HEADER + config.to_toml())
    # Who holds what, for analysis beside clients.jsonl (the split is the config's: the same
    # on every resume).
    write_partition(out_dir / PARTITION_FILE, fed.dataset.classes, fed.counts.tolist())
    recorder.summary("running", 0.0)

    sent = SentConfigs(config)
    guarded = GuardedGrid(
        grid,
        recorder,
        max_failure_fraction=config["max-failure-fraction"],
        client_timeout=config["client-timeout"],
        # The query pays Ray's cold start (actors, imports): a round's limit may be too short.
        query_timeout=max(config["round-timeout"], QUERY_TIMEOUT_FLOOR),
        stop=stop,
        divergence_cause=lambda server_round: divergence_cause(config, server_round),
        sent=sent,
    )
    if start.client_state:
        guarded.restore_client_state(start.client_state)
    bar = RunProgress(
        num_rounds,
        label or f"{config.loss.name} / {config.strategy.name}",
        enabled=bool(progress),
        silent=progress is None,
    )
    hooks = StrategyHooks(config.strategy.name, start.round, seed=config["seed"])
    strategy = hooks.attach(start.strategy)
    start_configs = (start.train_config, start.evaluate_config)
    evaluate = callbacks.RoundCallbacks(
        [
            callbacks.ModelCheck(config, model),
            callbacks.Evaluation(config, model, fed),
            callbacks.RoundAccounts(sent, guarded, hooks),
            callbacks.Recording(recorder, loggers, t_start),
            callbacks.Checkpointing(
                checkpoint_path, config, strategy, guarded, start_configs, recorder, t_start
            ),
            callbacks.progress(bar),
            *([callbacks.caller_hook(on_round)] if on_round is not None else []),
        ],
        start_round=start.round,
        hooks=hooks,
        resumed_row=next((r for r in recorder.rounds if r["round"] == start.round), None),
    )

    status, error = "failed", None
    try:
        with bar, _blamed_on(hooks, "start"):
            strategy.start(  # the strategy's own start(), if it has one
                grid=guarded,
                initial_arrays=start.arrays,
                num_rounds=num_rounds - start.round,
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
