"""What sweep executors share: a cell's job and its run in a worker, and the driver
side that runs several cells at once (:class:`Concurrent`).

- :class:`fedimb.sweep.processes.ProcessCells` (``fedimb sweep --jobs N``): N worker
  processes here (``spawn``: torch and fork do not mix), each running cells with the
  in-process engine one after another, torch threads divided among them, GPUs dealt
  round-robin. No Ray needed.
- :class:`fedimb.sweep.ray_cells.RayCells` (``fedimb sweep --ray [ADDRESS]``): each cell
  a Ray task with its own ``num_cpus`` / ``num_gpus``; the task runs in a folder of its
  own and sends the cell's files back, so no shared file system is assumed.

Both hand :func:`fedimb.sweep.run_sweep` a ``run_cell(overrides, cell_dir)`` that blocks
its caller until the cell has run elsewhere (its exception raised here, as if it had run
here), and an ``each(one, cells)`` that calls ``one`` for several cells at once on
threads of this process and yields their results as they finish. So claims, statuses,
failures, resume and the report stay the sweep's own code, whatever runs the cells.

A worker rebuilds the cell's config from the sweep's base file, the cell's overrides and
the plug-ins (:class:`CellJob`), so nothing but plain data crosses processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from fedimb.config import ConfigError
from fedimb.progress import RunProgress, stdout_is_terminal

# Seconds that running cells get to record an interruption before they are killed.
STOP_GRACE_S = 60.0

RoundsOf = Callable[[dict[str, Any]], int]
OnRound = Callable[[int, float | None], None]


class WorkerLost(RuntimeError):
    """The process or Ray worker running a cell ended without a word (killed, crashed)."""


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, shown as its cause."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class CellJob:
    """What a worker needs to rebuild any cell's config: plain, picklable data.

    ``threads``: torch threads per cell (0: leave the worker's default), used where the
    cell's own config leaves ``threads`` at 0 (auto).
    """

    base: str
    plugins: dict[str, list[str]]
    threads: int = 0


def default_threads(jobs: int, cores: int | None = None) -> int:
    """Torch threads per cell when ``jobs`` cells share this machine's cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, cores // max(1, jobs))


def check_inprocess(engines: dict[str, str], how: str) -> None:
    """Refuse cells whose engine is not the in-process one (each would start a Ray
    cluster of its own inside a worker). ``engines``: cell name -> its engine."""
    other = [name for name, engine in engines.items() if engine != "inprocess"]
    if other:
        raise ConfigError(
            f"{how} runs each cell with the in-process engine, but {len(other)} cell(s) "
            f"(e.g. {other[0]!r}) set engine = {engines[other[0]]!r}; add "
            '--set engine=inprocess (or engine = "inprocess" in the sweep\'s [set])'
        )


# --------------------------------------------------------------------- worker side


Outcome = tuple[str, BaseException | None, str | None]


def run_cell_here(
    job: CellJob, overrides: dict[str, Any], cell_dir: Path, on_round: OnRound | None = None
) -> Outcome:
    """Run one cell in this process (a worker); never raises.

    Returns ``(status, exception, traceback text)``: ``("completed", None, None)``,
    ``("failed", exc, text)`` with ``exc`` picklable, or ``("interrupted", None, None)``
    after SIGTERM or a stop.
    """
    from fedimb.config import load_config
    from fedimb.results import CHECKPOINT_FILE
    from fedimb.sim import run_experiment, threads_set_to

    def hook(server_round: int, row: dict[str, Any]) -> None:
        if on_round is not None:
            on_round(server_round, row.get("balanced_error"))

    try:
        config = load_config(job.base, overrides, plugins=job.plugins)
        with threads_set_to(job.threads if config["threads"] == 0 else 0):
            run_experiment(
                config,
                cell_dir,
                resume=(cell_dir / CHECKPOINT_FILE).exists(),
                progress=None,  # the driver shows the cell's line
                on_round=hook,
                label=cell_dir.name,
            )
    except KeyboardInterrupt:
        return "interrupted", None, None
    except Exception as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return "failed", _portable(exc), text
    return "completed", None, None


def _portable(exc: BaseException) -> BaseException:
    """``exc`` as it can cross to the driver (pickled; its traceback goes beside it)."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # an exception class that does not pickle: keep its name and text
        return type(type(exc).__name__, (RuntimeError,), {})(str(exc))


def raise_outcome(status: str, exc: BaseException | None, text: str | None) -> None:
    """In the driver: raise what the cell's run raised in its worker, if anything."""
    if status == "failed" and exc is not None:
        raise exc from _RemoteTraceback(text or "")
    if status == "interrupted":
        raise KeyboardInterrupt


class _CellLogFilter(logging.Filter):
    """Prefix a worker's log lines with the cell they came from."""

    cell = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = f"{self.cell}: {record.getMessage()}", ()
        return True


_CELL_LOG: _CellLogFilter | None = None


def quiet_worker_logs() -> _CellLogFilter:
    """The driver checked every cell up front and said each warning once; a worker says
    only what its run adds, naming the cell. Once per process (Ray reuses workers)."""
    global _CELL_LOG
    from fedimb.sim import quiet_flower

    quiet_flower()
    if _CELL_LOG is not None:
        return _CELL_LOG
    logging.getLogger("fedimb.preflight").setLevel(logging.ERROR)
    handler = logging.StreamHandler()
    cell_filter = _CellLogFilter()
    handler.addFilter(cell_filter)
    logging.getLogger("fedimb").addHandler(handler)
    logging.getLogger("fedimb").propagate = False
    _CELL_LOG = cell_filter
    return cell_filter


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------- driver side


class Concurrent:
    """Shared driver side: ``each`` runs ``one(cell)`` on ``slots`` threads at once."""

    slots = 1

    def __init__(self, rounds_of: RoundsOf, progress: bool) -> None:
        self.rounds_of = rounds_of
        self.progress = progress
        self.stopping = threading.Event()

    def each(self, one: Callable[[Any], Any], cells: Iterable[Any]) -> Iterator[Any]:
        """Yield ``one(cell)`` for every cell as they finish, ``slots`` at a time.

        On Ctrl-C (or any error here) no further cell starts; running ones are stopped
        (they record the interruption) and waited for, then the error is raised again.
        """
        cells = list(cells)
        if not cells:
            return
        self.start()
        pool = ThreadPoolExecutor(self.slots, thread_name_prefix="fedimb-cell")
        futures: list[Future[Any]] = [pool.submit(self._guarded, one, c) for c in cells]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=futures.index):
                    yield future.result()
        except BaseException:
            self.stopping.set()
            for future in futures:
                future.cancel()
            self._stop_running(futures)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _guarded(self, one: Callable[[Any], Any], cell: Any) -> Any:
        if self.stopping.is_set():  # a cell whose turn came as the sweep stopped
            raise KeyboardInterrupt
        return one(cell)

    def _stop_running(self, futures: list[Future[Any]]) -> None:
        """Ask the running cells to stop, wait for them; a second Ctrl-C kills them."""
        self.interrupt()
        try:
            wait(futures, timeout=STOP_GRACE_S)
        except KeyboardInterrupt:
            pass
        self.kill()
        wait(futures, timeout=STOP_GRACE_S)

    def cell_bar(self, overrides: dict[str, Any], cell_dir: Path) -> RunProgress:
        """The cell's own line under the sweep's bar, on a terminal only."""
        silent = not (self.progress and stdout_is_terminal())
        return RunProgress(self.rounds_of(overrides), cell_dir.name, silent=silent)

    def start(self) -> None:
        """Start the workers, if not started yet."""

    def interrupt(self) -> None:
        """Ask every running cell to stop and record it."""

    def kill(self) -> None:
        """End whatever still runs, without waiting."""
