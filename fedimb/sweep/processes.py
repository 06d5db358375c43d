"""``fedimb sweep --jobs N``: N worker processes on this machine run the cells (see
:mod:`fedimb.sweep.executors`)."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import threading
from pathlib import Path
from typing import Any

from fedimb.config import ConfigError
from fedimb.sweep.executors import (
    CellJob,
    Concurrent,
    RoundsOf,
    WorkerLost,
    default_threads,
    quiet_worker_logs,
    raise_interrupt,
    raise_outcome,
    run_cell_here,
)


def _worker_main(conn: Any, job: CellJob, gpu: str | None) -> None:
    """A ``--jobs`` worker: run the cells the driver sends until told to stop.

    SIGINT is ignored (a Ctrl-C at the terminal reaches every process of the group):
    the driver decides, and stops a running cell with one SIGTERM, which the run records
    as an interruption (resumable) before this process says so and ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, raise_interrupt)
    if gpu is not None:  # before torch first looks for devices
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        cell_log = quiet_worker_logs()  # imports the run's code while the driver validates
        _freeze_imports()
        while True:
            task = conn.recv()
            if task is None:
                return
            overrides, cell_dir = task
            cell_log.cell = Path(cell_dir).name
            outcome = run_cell_here(
                job,
                overrides,
                Path(cell_dir),
                on_round=lambda r, err: conn.send(("round", r, err)),
            )
            conn.send(outcome)
            if outcome[0] == "interrupted":
                return
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return  # stopped while idle, or the driver has gone


def _freeze_imports() -> None:
    """Keep what the imports made out of every later garbage collection, once.

    A run freezes the objects alive at its start itself (``frozen_start_up``), after a
    full collection of every object Python tracks (as long as a short digits cell's
    rounds: benchmarks/README.md). A worker's imports live as long as the worker, so
    it freezes them once and its runs skip that collection (``gc.get_freeze_count()``).
    """
    import gc

    import torch._dynamo  # noqa: F401  (as the first vectorised round would import it)

    gc.collect()
    gc.freeze()


class _Worker:
    def __init__(self, context: Any, job: CellJob, gpu: str | None) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(child, job, gpu), name="fedimb-cell", daemon=True
        )
        # Blocked in the child until it has its own handlers: a Ctrl-C while it starts
        # must not kill it with a traceback.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child.close()
        self.gpu = gpu
        self.busy = self.used = False

    def close(self) -> None:
        if not self.used:  # nothing to finish: do not wait for its imports
            self.process.kill()
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class ProcessCells(Concurrent):
    """``--jobs N``: N cells at once, each in a worker process of this machine.

    Parameters
    ----------
    jobs : int
        Worker processes (>= 1).
    job : CellJob
        How workers rebuild a cell's config; ``job.threads`` 0 becomes
        :func:`default_threads`.
    rounds_of : callable
        ``rounds_of(overrides)``: the cell's num-rounds, for its progress line.
    progress : bool
        False: no per-cell lines (``--quiet``).
    gpus : list of str, optional
        Device ids dealt round-robin to the workers (default: CUDA_VISIBLE_DEVICES, or
        every visible GPU, when there are several; one GPU is shared by all).
    """

    def __init__(
        self,
        jobs: int,
        job: CellJob,
        rounds_of: RoundsOf,
        *,
        progress: bool = True,
        gpus: list[str] | None = None,
    ) -> None:
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ConfigError(f"--jobs {jobs!r}: give a whole number of cells at once, >= 1")
        super().__init__(rounds_of, progress)
        self.slots = jobs
        threads = job.threads or default_threads(jobs)
        self.job = dataclasses.replace(job, threads=threads)
        self.gpus = visible_gpus() if gpus is None else gpus
        self._workers: list[_Worker] = []
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._workers:
            return
        context = multiprocessing.get_context("spawn")
        for i in range(self.slots):
            gpu = self.gpus[i % len(self.gpus)] if len(self.gpus) > 1 else None
            self._add(_Worker(context, self.job, gpu))

    def _add(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.append(worker)
        self._idle.put(worker)

    def run_cell(self, overrides: dict[str, Any], cell_dir: Path) -> None:
        """Run one cell on an idle worker; raise its exception here."""
        worker = self._idle.get()
        worker.busy, worker.used, ended = True, True, False
        try:
            self._run_on(worker, overrides, cell_dir)
        except (WorkerLost, KeyboardInterrupt):
            ended = True  # the worker has gone, or goes after its interruption
            raise
        finally:
            worker.busy = False
            if ended:
                self._replace(worker)
            else:
                self._idle.put(worker)

    def _run_on(self, worker: _Worker, overrides: dict[str, Any], cell_dir: Path) -> None:
        try:
            worker.conn.send((dict(overrides), str(Path(cell_dir).resolve())))
        except (OSError, ValueError) as exc:
            raise WorkerLost(f"the worker process has gone ({exc})") from None
        with self.cell_bar(overrides, cell_dir) as bar:
            while True:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    if self.stopping.is_set():
                        raise KeyboardInterrupt from None
                    worker.process.join(timeout=5)
                    raise WorkerLost(
                        f"the worker process running the cell died (exit code "
                        f"{worker.process.exitcode}; out of memory?)"
                    ) from None
                if message[0] == "round":
                    bar.update(message[1], message[2])
                    continue
                raise_outcome(*message)
                return

    def _replace(self, worker: _Worker) -> None:
        """Drop a worker that has ended; start another in its place (on its GPU) unless
        the sweep is stopping."""
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
        worker.conn.close()
        if not self.stopping.is_set():
            self._add(_Worker(multiprocessing.get_context("spawn"), self.job, worker.gpu))

    def interrupt(self) -> None:
        with self._lock:
            busy = [w for w in self._workers if w.busy and w.process.is_alive()]
        for worker in busy:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(worker.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            if worker.process.is_alive() and worker.busy:
                worker.process.kill()

    def close(self) -> None:
        """End every worker (idle ones finish at once)."""
        with self._lock:
            workers, self._workers = list(self._workers), []
        for worker in workers:
            worker.close()

    def __enter__(self) -> ProcessCells:
        self.start()  # the workers import torch while the driver checks the cells
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def visible_gpus() -> list[str]:
    """The GPU ids a worker may be given: CUDA_VISIBLE_DEVICES's entries, else 0..n-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
