"""Sweep executors: a sweep's cells several at a time, on this machine or on Ray.

- :class:`ProcessCells` (``fedimb sweep --jobs N``): N worker processes here (``spawn``:
  torch and fork do not mix), each running cells with the in-process engine one after
  another, torch threads divided among them, GPUs dealt round-robin. No Ray needed.
- :class:`RayCells` (``fedimb sweep --ray [ADDRESS]``): each cell a Ray task with its own
  ``num_cpus`` / ``num_gpus``; the task runs in a folder of its own and sends the cell's
  files back, so no shared file system is assumed.

Both hand :func:`fedimb.sweep.run_sweep` a ``run_cell(overrides, cell_dir)`` that blocks
its caller until the cell has run elsewhere (its exception raised here, as if it had run
here), and an ``each(one, cells)`` that calls ``one`` for several cells at once on
threads of this process and yields their results as they finish. So claims, statuses,
failures, resume and the report stay the sweep's own code, whatever runs the cells.

A worker rebuilds the cell's config from the sweep's base file, the cell's overrides and
the plug-ins (:class:`CellJob`), so nothing but plain data crosses processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
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


def _raise_outcome(status: str, exc: BaseException | None, text: str | None) -> None:
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


def _quiet_worker_logs() -> _CellLogFilter:
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


def _worker_main(conn: Any, job: CellJob, gpu: str | None) -> None:
    """A ``--jobs`` worker: run the cells the driver sends until told to stop.

    SIGINT is ignored (a Ctrl-C at the terminal reaches every process of the group):
    the driver decides, and stops a running cell with one SIGTERM, which the run records
    as an interruption (resumable) before this process says so and ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if gpu is not None:  # before torch first looks for devices
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        cell_log = _quiet_worker_logs()  # imports the run's code while the driver validates
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
    full collection of every object Python tracks (0.2-0.3 s a cell on 2 cores, as long
    as a short digits cell's rounds). A worker's imports live as long as the worker, so
    it freezes them once and its runs skip that collection (``gc.get_freeze_count()``).
    """
    import gc

    import torch._dynamo  # noqa: F401  (as the first vectorised round would import it)

    gc.collect()
    gc.freeze()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------- driver side


class _Concurrent:
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


class ProcessCells(_Concurrent):
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
                _raise_outcome(*message)
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


# --------------------------------------------------------------------- Ray


def _read_folder(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes); none if it does not exist."""
    if not folder.is_dir():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")  # half-written temporaries
    }


def _write_folder(folder: Path, files: dict[str, bytes], sent: Iterable[str] = ()) -> None:
    """Write ``files`` into ``folder`` atomically each; remove those ``sent`` that the
    cell's run removed."""
    from fedimb.results import atomic_write_bytes

    for rel, data in files.items():
        atomic_write_bytes(folder / rel, data)
    for rel in set(sent) - set(files):
        (folder / rel).unlink(missing_ok=True)


def _ray_cell_task(
    job: CellJob, overrides: dict[str, Any], name: str, files: dict[str, bytes], board: Any
) -> tuple[Outcome, dict[str, bytes]]:
    """A Ray task: run the cell in a folder of its own, send its files back."""
    import ray

    cell_log = _quiet_worker_logs()
    cell_log.cell = name

    def on_round(server_round: int, error: float | None) -> None:
        board.report.remote(name, server_round, error)
        if ray.get(board.stopped.remote()):  # between rounds: the checkpoint is written
            raise KeyboardInterrupt

    with tempfile.TemporaryDirectory(prefix="fedimb-cell-") as tmp:
        cell_dir = Path(tmp) / name
        _write_folder(cell_dir, files)
        outcome = run_cell_here(job, overrides, cell_dir, on_round)
        return outcome, _read_folder(cell_dir)


class _Board:
    """A Ray actor between the driver and its cells: rounds done, and a stop flag."""

    def __init__(self) -> None:
        self._stop = False
        self._rounds: dict[str, tuple[int, float | None]] = {}

    def report(self, name: str, server_round: int, error: float | None) -> None:
        self._rounds[name] = (server_round, error)

    def latest(self, name: str) -> tuple[int, float | None] | None:
        return self._rounds.get(name)

    def stop(self) -> None:
        self._stop = True

    def stopped(self) -> bool:
        return self._stop


class RayCells(_Concurrent):
    """``--ray [ADDRESS]``: each cell a Ray task on a local or existing cluster.

    Parameters
    ----------
    address : str
        The cluster (``auto``, ``host:port``, ``ray://host:port``); '' starts a local one.
    job : CellJob
        How a task rebuilds its cell's config; ``job.threads`` 0 becomes the cell's CPUs.
    rounds_of : callable
        ``rounds_of(overrides)``: the cell's num-rounds, for its progress line.
    cell_cpus, cell_gpus : float
        Ray resources per cell (fractions allowed: 3 cells may share a GPU at 0.33);
        ``cell_gpus`` None: 1 where the cluster has GPUs, else 0.
    progress : bool
        False: no per-cell lines (``--quiet``).
    """

    POLL_S = 0.5

    def __init__(
        self,
        address: str,
        job: CellJob,
        rounds_of: RoundsOf,
        *,
        cell_cpus: float = 1.0,
        cell_gpus: float | None = None,
        progress: bool = True,
    ) -> None:
        for flag, value in (("--cell-cpus", cell_cpus), ("--cell-gpus", cell_gpus or 0.0)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag} {value!r}: give a number >= 0 (fractions allowed)")
        if cell_cpus == 0 and cell_gpus == 0:
            raise ConfigError("--cell-cpus 0 --cell-gpus 0: a cell needs a CPU or a GPU share")
        super().__init__(rounds_of, progress)
        self.address = address
        self.cell_cpus, self.cell_gpus = cell_cpus, cell_gpus
        self.job = dataclasses.replace(job, threads=job.threads or max(1, int(cell_cpus)))
        self._started_ray = False
        self._board: Any = None
        self._task: Any = None
        self._running: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RayCells:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--ray needs Ray, which is not installed here: pip install 'ray[default]', "
                "or run the cells here with --jobs N"
            ) from None
        from fedimb.engines.ray import check_ray_address, init_ray

        if self.address:
            check_ray_address(self.address)
        was_running = ray.is_initialized()
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if self.address:
            init_args["address"] = self.address
        try:
            init_ray(init_args)
        except (ConnectionError, RuntimeError) as exc:
            raise ConfigError(
                f"--ray {self.address or '(local)'}: Ray did not start or connect: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        self._started_ray = not was_running
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():  # ray.init's SIGTERM would exit at once
                if handler is not None:
                    signal.signal(sig, handler)
        try:
            cluster = ray.cluster_resources()
            if self.cell_gpus is None:
                self.cell_gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
            self.slots = self._check_fits(cluster)
            self._board = ray.remote(num_cpus=0)(_Board).remote()
            self._task = ray.remote(_ray_cell_task).options(
                num_cpus=self.cell_cpus, num_gpus=self.cell_gpus, max_retries=0
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def _check_fits(self, cluster: dict[str, float]) -> int:
        """How many cells the cluster runs at once; a ConfigError where none fits."""
        where = f"the Ray cluster{f' at {self.address}' if self.address else ''}"
        fits = []
        for flag, resource, amount in (
            ("--cell-cpus", "CPU", self.cell_cpus),
            ("--cell-gpus", "GPU", self.cell_gpus or 0.0),
        ):
            have = cluster.get(resource, 0)
            if amount > have:
                raise ConfigError(
                    f"{flag} {amount:g}: {where} has {have:g} {resource}(s), so no cell "
                    f"could start; give at most {have:g}"
                )
            if amount:
                fits.append(int(have // amount + 1e-9))
        return max(1, min(fits))

    def __exit__(self, *exc: object) -> None:
        import ray

        self.kill()  # tasks left by an error of the sweep itself
        if self._board is not None:
            with contextlib.suppress(Exception):
                ray.kill(self._board)
            self._board = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def run_cell(self, overrides: dict[str, Any], cell_dir: Path) -> None:
        """Run one cell as a Ray task; its files land in ``cell_dir``."""
        import ray
        from ray.exceptions import RayError

        cell_dir = Path(cell_dir)
        sent = _read_folder(cell_dir)
        ref = self._task.remote(self.job, dict(overrides), cell_dir.name, sent, self._board)
        with self._lock:
            self._running[cell_dir.name] = ref
        try:
            with self.cell_bar(overrides, cell_dir) as bar:
                shown = None
                while not ray.wait([ref], timeout=self.POLL_S)[0]:
                    latest = ray.get(self._board.latest.remote(cell_dir.name))
                    if latest is not None and latest != shown:
                        bar.update(*latest)
                        shown = latest
                outcome, files = ray.get(ref)
        except RayError as exc:
            if self.stopping.is_set():
                raise KeyboardInterrupt from None
            first = str(exc).strip().splitlines()
            raise WorkerLost(
                f"Ray lost the cell's task ({type(exc).__name__}: {first[0] if first else ''})"
            ) from None
        finally:
            with self._lock:
                self._running.pop(cell_dir.name, None)
        _write_folder(cell_dir, files, sent)
        _raise_outcome(*outcome)

    def interrupt(self) -> None:
        if self._board is not None:
            self._board.stop.remote()

    def kill(self) -> None:
        import ray

        with self._lock:
            refs = list(self._running.values())
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
