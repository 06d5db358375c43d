"""The ``ray`` engine: Flower's simulation engine (Ray backend) started in this process
through Flower's own simulation entry point, one Flower node per client, with client
resources and an optional existing Ray cluster (``ray.address``) from the config.

Also what Ray needs around it: checks of the cluster's address and resources, starting
Ray so that fedimb keeps its signal handlers, and Ctrl-C / SIGTERM while Flower's server
runs in a thread of its own (:class:`RayInterruption`). torch, Flower, Ray and the server
are imported where used, so that registering the engine imports none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedimb.engines.base import Engine, register_engine

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.serverapp import Grid

    from fedimb.config import Config
    from fedimb.server import SimulationEnded

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds a failed Ray run waits for its server thread to record the failure.
SERVER_EXIT_WAIT = 30.0
# A local Ray run shorter than this (seconds, start to shutdown) gets the in-process hint.
SHORT_RUN_S = 60.0

log = logging.getLogger(__name__)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast when ``ray.address`` names a host:port that nothing answers on.

    Ray itself retries an unreachable cluster for minutes, logging as it goes. ``auto``
    and addresses without a port are left to Ray.
    """
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    from fedimb.config import ConfigError

    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"ray.address = {address!r}: nothing answers at {host}:{port} ({exc}); start the "
            "cluster there (`ray start --head`) or leave ray.address empty for a local one"
        ) from exc


class RayInterruption:
    """Ctrl-C and SIGTERM during a Ray run.

    Flower runs the server in a thread of its own, and Ray must not be interrupted in the
    middle of a call: a KeyboardInterrupt raised into ``ray.init``, or into Flower's
    teardown while its threads still wait in ``ray.get``, crashed the process (exit -11)
    or left it waiting on those threads. So the first signal only sets ``stop``: the
    server raises KeyboardInterrupt in its own thread at its next wait for replies and
    records the interruption, Flower then ends the simulation as after a completed run,
    and :meth:`raise_if_stopped` raises in the main thread. A second signal raises at once.
    """

    def __init__(self) -> None:
        from fedimb.server import ServerStop

        self.stop = ServerStop()
        self.signalled = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        self.stop.set()

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (main thread only; SIGINT stays ignored where it is,
        as in a process started in the background)."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self.handle)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self.handle)

    def raise_if_stopped(self, summary: dict[str, Any]) -> None:
        # A signal after the last round (Ray shutting down) leaves a completed run as it
        # is; a sweep then stops before its next cell (late_interrupt).
        if self.signalled and summary.get("status") != "completed":
            raise KeyboardInterrupt
        if self.signalled:
            _LATE_INTERRUPT.set()


# Set by a Ctrl-C or SIGTERM that reached a Ray run after its last round.
_LATE_INTERRUPT = threading.Event()


def late_interrupt() -> bool:
    """Whether a Ray run since the last call was signalled to stop after its last round
    (it completed): a caller with more runs to go should stop. Clears the flag."""
    was = _LATE_INTERRUPT.is_set()
    _LATE_INTERRUPT.clear()
    return was


def run_ray(config: Config, out_dir: Path, *, verbose: bool, **kwargs: Any) -> dict[str, Any]:
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from clients.app import app as client_app
    from fedimb.config import ConfigError
    from fedimb.server import root_cause

    # Flower installs app dependencies at run time by default; everything is installed.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    server = RayServer(config, out_dir, **kwargs)
    interruption = server.interruption
    started = time.perf_counter()

    resources = {"num_cpus": config["ray.client-cpus"], "num_gpus": client_gpus(config)}
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose}
    if not verbose:
        init_args["logging_level"] = "WARNING"  # as Flower sets it
    if config["ray.address"]:
        init_args["address"] = config["ray.address"]
    with interrupt_handlers_kept():
        interruption.install()
        try:
            init_ray(init_args)
        except SystemExit as exc:  # SIGTERM inside ray.init, which installs its own handler
            if exc.code == signal.SIGTERM:
                raise KeyboardInterrupt from exc
            raise
        interruption.install()  # ray.init replaced the SIGTERM handler
        try:
            check_ray_resources(config)
            _run_simulation(
                num_supernodes=config["num-clients"],
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server.app,
                backend_name="ray",
                backend_config={"client_resources": resources, "init_args": init_args},
                verbose_logging=verbose,
            )
        except Exception as exc:
            if isinstance(exc, ConfigError) or server.raised(exc):
                raise
            if interruption.signalled:  # e.g. actors killed by a SIGTERM to the group
                raise KeyboardInterrupt from exc
            if server.summary.get("status") != "completed":
                # The runtime itself stopped (e.g. no actor could start).
                raise server.runtime_stopped(exc) from exc
            log.warning("Flower's runtime failed after the last round: %s", root_cause(exc))
        finally:
            interruption.stop.set()  # a server thread still waiting for replies ends
            _shutdown_ray()
    interruption.raise_if_stopped(server.summary)
    if not server.summary:
        raise RuntimeError(
            "the Flower simulation ended without running the server (see the log above)"
        )
    if not config["ray.address"]:
        hint_inprocess(time.perf_counter() - started, server.seconds)
    return server.summary


_HINTED = threading.Event()  # the in-process hint is given once per process (a sweep)


def hint_inprocess(total_s: float, server_s: float) -> bool:
    """Say once, after a local Ray run that was short or mostly Ray's start and shutdown,
    that ``--engine inprocess`` runs the same rounds without Ray; whether it said so.

    ``total_s``: the whole Ray run; ``server_s``: the part the server's rounds took.
    """
    overhead = total_s - server_s
    if _HINTED.is_set() or (total_s >= SHORT_RUN_S and overhead < server_s):
        return False
    _HINTED.set()
    log.warning(
        "this Ray run took %.1f s, %.1f s of it starting and stopping Flower's simulation "
        'on Ray; `--engine inprocess` (or engine = "inprocess") runs the same rounds '
        "in this process without Ray, with the same server, strategy and client code",
        total_s,
        overhead,
    )
    return True


class RayServer:
    """fedimb's server as the ServerApp that Flower's simulation runs in a thread of its own.

    It keeps what the main thread needs afterwards: the run's summary, the server's own
    exceptions (Flower raises them again in the main thread), and a lock held while the
    server runs, so that a failure of the runtime can wait until the server recorded it.
    """

    def __init__(self, config: Config, out_dir: Path, **kwargs: Any) -> None:
        from flwr.serverapp import ServerApp

        self.config, self.out_dir, self.kwargs = config, out_dir, kwargs
        self.summary: dict[str, Any] = {}
        self.interruption = RayInterruption()
        self.app = ServerApp()
        self.app.main()(self.main)
        self._error: BaseException | None = None
        self._running = threading.Lock()
        self.seconds = 0.0  # how long the server ran (Ray's start and shutdown excluded)

    def main(self, grid: Grid, context: Context) -> None:
        from fedimb.server import SimulationEnded, run_server

        del context  # the config comes from fedimb, not from a Flower project
        stop = self.interruption.stop
        with self._running:
            if stop.is_set():
                return  # interrupted while Ray started
            began = time.perf_counter()
            try:
                self.summary.update(
                    run_server(grid, self.config, self.out_dir, stop=stop, **self.kwargs)
                )
                self.seconds = time.perf_counter() - began
            except (KeyboardInterrupt, SimulationEnded):
                pass  # raised on `stop`: recorded; the main thread raises its own
            except BaseException as exc:
                self._error = exc
                raise

    def raised(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the server's own (a failed run, a user's hook)."""
        return exc is self._error

    def runtime_stopped(self, cause: BaseException) -> SimulationEnded:
        """End the server's wait as a failure of the run, once it has recorded that."""
        from fedimb.server import SimulationEnded

        self.interruption.stop.fail(cause)
        if self._running.acquire(timeout=SERVER_EXIT_WAIT):
            self._running.release()
        return SimulationEnded(cause)


def check_ray_resources(config: Config, local: bool = False) -> None:
    """Fail before the first round where no client actor fits in the Ray cluster (Flower's
    engine would stop after the server's round 0, with "ActorPool is empty").

    ``local``: before Ray starts, against this machine's CPUs and GPUs (Ray never counts
    more); else against the running cluster's resources.
    """
    from fedimb.config import ConfigError

    if local:
        import torch

        where = "this machine"
        cluster = {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}
    else:
        import ray

        where, cluster = "the Ray cluster", ray.cluster_resources()
    asked = {"ray.client-cpus": ("CPU", config["ray.client-cpus"])}
    asked["ray.client-gpus"] = ("GPU", client_gpus(config))
    for key, (resource, amount) in asked.items():
        have = cluster.get(resource, 0)
        if amount > have:
            raise ConfigError(
                f"{key} = {amount:g}: {where} has {have:g} {resource}(s), so no client "
                f"could start; set {key} to at most {have:g}"
            )


def init_ray(init_args: dict[str, Any]) -> None:
    """Start (or join) Ray as Flower's RayBackend would, which then leaves it as it is.

    Done here so that fedimb can take SIGTERM back from ``ray.init``. As in Flower, the
    actors get the driver's ``sys.path`` (they import ``clients``, ``strategies`` and
    plug-ins) and a Ray already started is used as it is. Unlike Flower, the driver's own
    PYTHONPATH is restored afterwards (Flower's grows with every run).
    """
    import ray

    if ray.is_initialized():
        return
    before = os.environ.get("PYTHONPATH")
    paths = [*sys.path, *(before or "").split(os.pathsep)]
    pythonpath = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    os.environ["PYTHONPATH"] = pythonpath  # for the processes ray.init starts
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextlib.contextmanager
def interrupt_handlers_kept() -> Iterator[None]:
    """Restore the SIGINT and SIGTERM handlers on exit (``ray.init`` replaces SIGTERM's for
    good, with one that exits the process). Only the main thread has handlers; one set
    outside Python, which cannot be put back, becomes the default."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in INTERRUPT_SIGNALS} if main_thread else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is None:
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)


def client_gpus(config: Config) -> float:
    """GPUs per Ray actor: as configured, or, when 0 and a GPU is visible (and the device is
    not forced to CPU), a share such that every actor the CPUs allow uses the GPU."""
    import torch

    gpus = config["ray.client-gpus"]
    if gpus == 0 and config["device"] != "cpu":
        if torch.cuda.is_available():
            gpus = min(1.0, config["ray.client-cpus"] / max(os.cpu_count() or 1, 1))
    return gpus


def _shutdown_ray() -> None:
    """Stop the local Ray cluster Flower started, so the next run (or sweep cell) starts clean."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


@register_engine("ray")
class RayEngine(Engine):
    """Flower's simulation engine on Ray (a local cluster, or ``ray.address``'s)."""

    @staticmethod
    def check(config: Config) -> None:
        if config["ray.address"]:
            check_ray_address(config["ray.address"])
        else:
            check_ray_resources(config, local=True)  # the cluster's own check waits for Ray

    @staticmethod
    def run(config: Config, out_dir: Path, *, verbose: bool, **kwargs: Any) -> dict[str, Any]:
        return run_ray(config, out_dir, verbose=verbose, **kwargs)
