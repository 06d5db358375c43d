"""Launch a run on one of two engines, with the same ServerApp code and ClientApp.

- ``engine = "ray"``: Flower's simulation engine (Ray backend), started in this process
  through Flower's own simulation entry point; one Flower node per client, client
  resources and an optional existing Ray cluster (``ray.address``) from the config.
- ``engine = "inprocess"``: :class:`fedimb.engine.InProcessGrid`, no Ray; a round's
  clients are trained together on the device.

Everything that can be wrong with the config or the data is found before either engine
starts (:func:`prepare`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedimb import batched
from fedimb.config import FIXED_TABLES, Config, ConfigError, declares, snake_to_kebab
from fedimb.data.datasets import BUNDLED_DATASETS
from fedimb.data.partition import partition_params
from fedimb.federation import Federation, loss_kwargs
from fedimb.server import RoundHook, ServerStop, SimulationEnded, root_cause, run_server

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds a failed Ray run waits for its server thread to record the failure.
SERVER_EXIT_WAIT = 30.0

log = logging.getLogger(__name__)


def quiet_flower(verbose: bool = False) -> None:
    """Keep Flower's per-round INFO logs out of the user's terminal unless asked for."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)


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
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"ray.address = {address!r}: nothing answers at {host}:{port} ({exc}); start the "
            "cluster there (`ray start --head`) or leave ray.address empty for a local one"
        ) from exc


def load_federation(config: Config) -> Federation:
    """The config's data and partition; what cannot be built is a :class:`ConfigError`."""
    from fedimb.federation import get_federation

    try:
        fed = get_federation(config)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from exc
    warn_about_partition(config, fed)
    return fed


def warn_about_settings(config: Config) -> None:
    """Say when a key the config sets, or a default it keeps, changes nothing."""
    import strategies

    warn_about_ignored_keys(config, config.components)
    inert = strategies.trains_as_fedavg(config.strategy.name, config.strategy_kwargs())
    if inert and inert[0] not in config.strategy.kwargs():  # not a baseline set on purpose
        key = snake_to_kebab(inert[0])
        log.warning(
            "strategy %r with %s = %g trains exactly as fedavg: set strategy.%s",
            config.strategy.name,
            key,
            inert[1],
            key,
        )
    _warn_about_plugins(config)
    decays = config["lr-schedule.decay"] != 1
    drops = bool(config["lr-schedule.milestones"].strip())
    gamma_default = FIXED_TABLES["lr-schedule"]["gamma"].default
    if not drops and config["lr-schedule.gamma"] != gamma_default:
        log.warning("lr-schedule.gamma is ignored: lr-schedule.milestones is empty")
    if config["data-root"] and config["dataset"] in BUNDLED_DATASETS:
        log.warning("data-root is ignored: dataset %r needs no files", config["dataset"])
    if (decays or drops) and config.strategy.name == "qfedavg":
        log.warning(  # it rescales the updates by its own constant lr
            "strategy 'qfedavg' keeps its client-learning-rate while [lr-schedule] changes "
            "the clients' lr"
        )


def warn_about_ignored_keys(config: Config, tables: Iterable[str]) -> None:
    """Name each key of these component tables that their chosen component does not take
    (kept for another component of the table)."""
    for table in tables:
        component = config.components[table]
        for key in sorted(component.ignored):
            log.warning(
                "%s.%s is ignored: %s %r does not take it", table, key, table, component.name
            )


def _warn_about_plugins(config: Config) -> None:
    """A plug-in model without a cosine head under LDAM, or a plug-in loss without a
    logit scale on one: what a built-in would get, it cannot."""
    from fedimb.federation import COSINE_HEAD_LOSSES, model_kwargs
    from fedimb.losses import COSINE_SCALE

    model, loss = config.model.name, config.loss.name
    if (
        loss in COSINE_HEAD_LOSSES
        and "cosine-head" not in config.model.params
        and not declares("model", model, "cosine-head")
    ):
        log.warning(
            "loss %r turns model.cosine-head on, but model %r takes no cosine_head: LDAM's "
            "margins act on its unnormalised logits",
            loss,
            model,
        )
    cosine = model_kwargs(config).get("cosine_head", False)
    if cosine and "s" not in config.loss.params and not declares("loss", loss, "s"):
        log.warning(
            "loss %r takes no s: on a cosine head (model.cosine-head) its logits lie in "
            "[-1, 1], where the built-in losses get s = %g; give its factory an s parameter",
            loss,
            COSINE_SCALE,
        )


def warn_about_partition(config: Config, fed: Federation) -> None:
    """Say before a run, not after, when the split is not what its config suggests."""
    unheld = np.flatnonzero(fed.counts.sum(axis=0) == 0)
    if unheld.size:  # their test error stays 1
        names = ", ".join(str(fed.dataset.classes[c]) for c in unheld)
        log.warning("no client holds class(es) %s: the global model never trains on them", names)
    if config.partition.name == "label-skew":
        # A class with fewer samples than the clients drawn to share it (a long tail's
        # rare classes) leaves some of them without it.
        wanted = {**partition_params("label-skew"), **config.partition.kwargs()}
        short = np.flatnonzero((fed.counts > 0).sum(axis=1) < wanted["classes_per_client"])
        if short.size:
            shown = ", ".join(map(str, short[:10])) + (", ..." if short.size > 10 else "")
            log.warning(
                "%d client(s) hold fewer than %d classes (%s): a rare class has fewer samples "
                "than the clients drawn to share it",
                short.size,
                wanted["classes_per_client"],
                shown,
            )


def prepare(config: Config) -> None:
    """Load the data and build the partition, the model, one client's loss and sampler
    now, so bad input fails before Ray starts (and before a sweep runs any cell)."""
    from fedimb.client import model_for
    from fedimb.losses import make_loss
    from fedimb.sampling import epoch_indices

    if config["engine"] == "ray" and config["ray.address"]:
        check_ray_address(config["ray.address"])
    elif config["engine"] == "ray":
        check_ray_resources(config, local=True)  # the cluster's own check waits for Ray
    warn_about_settings(config)
    fed = load_federation(config)
    if config["precision"] != "fp32" and fed.device.type != "cuda":
        log.warning("precision = %r applies on CUDA only: this run is fp32", config["precision"])

    with _component_errors(config, "model"):  # a model that does not fit the data
        model_for(config, fed)
    with _component_errors(config, "loss"):  # a parameter that fails on the real counts
        make_loss(
            config.loss.name,
            fed.counts[0],
            server_round=1,
            num_rounds=config["num-rounds"],
            **loss_kwargs(config),
        )
    with _component_errors(config, "sampling"):  # e.g. a drs-start after the last round
        epoch_indices(
            config.sampling.name,
            np.repeat(np.arange(fed.num_classes), fed.counts[0]),
            np.random.default_rng(0),
            server_round=1,
            num_rounds=config["num-rounds"],
            **config.sampling.kwargs(),
        )


@contextlib.contextmanager
def _component_errors(config: Config, table: str) -> Iterator[None]:
    """A component's ValueError or TypeError (a plug-in's error of any type: the user's
    own code) as one line naming it."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        if not config.raised_by(table, exc):
            raise
        raise config.component_error(table, exc) from exc


def check_same_defaults(out_dir: str | Path) -> None:
    """Refuse to continue a run that began under other defaults (``DEFAULTS_VERSION``)."""
    from fedimb.results import CHECKPOINT_FILE, DEFAULTS_VERSION, SUMMARY_FILE, read_json

    summary = read_json(Path(out_dir) / SUMMARY_FILE)
    if summary is None:  # written before round 1: gone since, or the run never began
        if (Path(out_dir) / CHECKPOINT_FILE).exists():
            raise ConfigError(
                f"{out_dir} has a checkpoint but no {SUMMARY_FILE}, so the fedimb defaults "
                "it began under are unknown: run it again in another folder (or delete its "
                f"{CHECKPOINT_FILE} to start it over)"
            )
        return
    began = summary.get("defaults", 1)
    if began != DEFAULTS_VERSION:
        raise ConfigError(
            f"{out_dir} began under fedimb's defaults {began}, this version has "
            f"{DEFAULTS_VERSION} (see DEFAULTS_VERSION in fedimb/results.py): continuing it "
            "would mix the two; run it again in another folder"
        )


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
        if config["engine"] == "inprocess":
            return _run_inprocess(config, Path(out_dir), **kwargs)
        return _run_ray(config, Path(out_dir), verbose=verbose, **kwargs)


@contextlib.contextmanager
def torch_threads(config: Config) -> Iterator[None]:
    """Run with the ``threads`` setting's number of torch threads, then restore torch's.

    This process trains the in-process engine's clients and evaluates the global model
    (Ray's actors get ``ray.client-cpus`` threads from Ray). ``threads = 0`` (auto): one
    thread on CPU for models without convolutions, else torch's default (one per core).
    Small matrix products gain nothing from a second thread and lose much when another
    process wants a core: every parallel operation then waits for a descheduled thread.
    Measured on 2 cores, a 20-round quickstart run in-process (digits MLP): 0.5-0.6 s with
    2 threads or 1 on an idle machine; beside one busy process 1.7-2.1 s with 2 threads,
    0.5-0.6 s with 1. A CNN step (batch 32) gains from the second core when it is free:
    28 vs 43 ms (79 vs 49 ms beside a busy process).
    """
    from fedimb.client import model_for
    from fedimb.federation import get_federation

    fed = get_federation(config)
    count = thread_count(config["threads"], model_for(config, fed), fed.device)
    if count == 0:
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


def _run_inprocess(config: Config, out_dir: Path, **kwargs: Any) -> dict[str, Any]:
    from clients.app import app as client_app
    from fedimb.client import model_for
    from fedimb.engine import InProcessGrid, frozen_start_up, task_identity
    from fedimb.federation import get_federation

    fed = get_federation(config)
    vectorised = batched.wanted(config["batched"], model_for(config, fed), fed.device)
    grid = InProcessGrid(client_app, config["num-clients"], batched=config["batched"] != "off")
    with task_identity(grid.run.run_id), frozen_start_up(vectorised=vectorised):
        return run_server(grid, config, out_dir, **kwargs)


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


def _run_ray(config: Config, out_dir: Path, *, verbose: bool, **kwargs: Any) -> dict[str, Any]:
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from clients.app import app as client_app

    # Flower installs app dependencies at run time by default; everything is installed.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    server = RayServer(config, out_dir, **kwargs)
    interruption = server.interruption

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
    return server.summary


class RayServer:
    """fedimb's server as the ServerApp that Flower's simulation runs in a thread of its own.

    It keeps what the main thread needs afterwards: the run's summary, the server's own
    exceptions (Flower raises them again in the main thread), and a lock held while the
    server runs, so that a failure of the runtime can wait until the server recorded it.
    """

    def __init__(self, config: Config, out_dir: Path, **kwargs: Any) -> None:
        self.config, self.out_dir, self.kwargs = config, out_dir, kwargs
        self.summary: dict[str, Any] = {}
        self.interruption = RayInterruption()
        self.app = ServerApp()
        self.app.main()(self.main)
        self._error: BaseException | None = None
        self._running = threading.Lock()

    def main(self, grid: Grid, context: Context) -> None:
        del context  # the config comes from fedimb, not from a Flower project
        stop = self.interruption.stop
        with self._running:
            if stop.is_set():
                return  # interrupted while Ray started
            try:
                self.summary.update(
                    run_server(grid, self.config, self.out_dir, stop=stop, **self.kwargs)
                )
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
    if local:
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
    gpus = config["ray.client-gpus"]
    if gpus == 0 and config["device"] != "cpu":
        import torch

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
