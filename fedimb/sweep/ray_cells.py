"""``fedimb sweep --ray [ADDRESS]``: each cell a Ray task (see
:mod:`fedimb.sweep.executors`); its files come back to the sweep's folder here."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedimb.config import ConfigError
from fedimb.sweep.executors import (
    CellJob,
    Concurrent,
    Outcome,
    RoundsOf,
    WorkerLost,
    quiet_worker_logs,
    raise_outcome,
    run_cell_here,
)


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

    cell_log = quiet_worker_logs()
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


class RayCells(Concurrent):
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
        raise_outcome(*outcome)

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
