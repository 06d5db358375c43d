"""The results directory of a run, written so that a crash never leaves a half file.

Layout (one run)::

    config.toml      the resolved config (nested TOML, re-runnable with --config)
    partition.json   the class names and each client's per-class training counts
    metrics.jsonl    one JSON object per evaluated round (round 0 = the initial model)
    clients.jsonl    per-client training metrics, one object per client and round
    summary.json     status, final/best balanced error, wall time, seed, versions
    checkpoint.pt    global model, strategy, RNG and client state of the last
                     checkpointed round (written by ``fedimb.server.save_checkpoint``)
    curves.png       balanced and per-class error over the rounds (``fedimb run``, at
                     the end; ``fedimb.report.plot_run_curves``)
    tensorboard/     event files, with ``loggers = "tensorboard"`` (``fedimb.loggers``)

A sweep folder also holds ``sweep.json`` (its cells and their status) and one run
folder per cell.

Every file but clients.jsonl is replaced atomically: written to a temporary file in the
same folder, flushed to disk, then renamed over the old one (``os.replace`` is atomic on
POSIX). clients.jsonl grows by one appended write per round (:func:`append_jsonl`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedimb.config import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CLIENTS_FILE = "clients.jsonl"
SUMMARY_FILE = "summary.json"
PARTITION_FILE = "partition.json"
CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "curves.png"  # a single run's, drawn at its end (fedimb.report)
TENSORBOARD_DIR = "tensorboard"  # loggers = "tensorboard" (fedimb.loggers)
SWEEP_FILE = "sweep.json"
# config.toml's first line: a run's folder tells fedimb's own config from a user's file.
CONFIG_HEADER = (
    "# The resolved config of this run, written by fedimb (re-runnable with --config).\n"
)
# What a run writes into its folder (a new run may start over in a folder holding these).
RUN_FILES = frozenset(
    {CONFIG_FILE, METRICS_FILE, CLIENTS_FILE, SUMMARY_FILE, PARTITION_FILE, CHECKPOINT_FILE}
    | {CURVES_FILE, TENSORBOARD_DIR}
)

# Results files get the mode open() would give them (mkstemp's is 0600): 0644 under the
# usual umask 022. The umask can only be read by setting it: once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


class DamagedFile(ConfigError):
    """A results file that cannot be read: cut short, edited, or not fedimb's."""


class FolderBusy(ConfigError):
    """A results folder that another fedimb process holds (:func:`claimed`)."""


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def check_target_error(value: Any, name: str = "target-error") -> float | None:
    """A target balanced error in [0, 1] (or None: no target), as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@contextlib.contextmanager
def claimed(
    path: str | os.PathLike[str], *, new: bool = False, shared: bool = False
) -> Iterator[Path]:
    """Hold the results folder ``path`` (created if missing) for this process alone
    while a run or a sweep writes there.

    A second fedimb process that claims it gets a ConfigError instead of mixing its rows
    into this one's. The claim is an advisory ``flock`` on the folder itself (no lock
    file), released when the process ends, however it ends. A folder this call created
    (or the caller, for this work: ``new``) and the work left empty (it failed before
    writing anything) is removed again. ``shared``: held beside other shared holders
    (sweeps that work in one folder, each claiming its own cells), not beside a sole one.

    Raises
    ------
    FolderBusy
        If ``path`` is claimed already (by a sole holder, or by any for a sole claim).
    ConfigError
        If ``path`` is a file, or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: a file is there, not a folder")
    created = new or not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the results folder {path}: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"cannot write in the results folder {path} (read-only)")
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"{path} is being written by another fedimb process: wait for it to end, "
                "or choose another folder"
            ) from None
        except OSError as exc:  # NFS, Lustre: no flock on a folder; the run still runs
            log.warning("cannot lock %s (%s): a second writer there is not stopped", path, exc)
        yield path
    finally:
        if created:  # before the lock goes: another process must not claim it meanwhile
            with contextlib.suppress(OSError):  # only while it is still empty
                path.rmdir()
        os.close(fd)


def check_fresh_folder(out: Path) -> None:
    """A new run may write into an empty folder, or one of an earlier attempt that ended
    before its summary (it starts over); not over a run, nor over other files."""
    if (out / SUMMARY_FILE).exists():
        raise ConfigError(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out"
        )
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if not p.name.startswith(".")  # an interrupted atomic write's temporary file
        and (p.name not in RUN_FILES or (p.name == CONFIG_FILE and not _written_by_us(p)))
    )
    if foreign:
        raise ConfigError(
            f"--out {out} holds files that are not a fedimb run's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): choose an empty or new folder"
        )


def _written_by_us(config_file: Path) -> bool:
    """Whether ``config_file`` is a config.toml that fedimb wrote: its first line says so,
    or (from a fedimb before that line) the run's partition.json lies beside it."""
    try:
        with config_file.open(errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    return first == CONFIG_HEADER or (config_file.parent / PARTITION_FILE).exists()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively; numpy scalars to Python."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (non-finite floats become null)."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines, replacing the file atomically."""
    text = "".join(json.dumps(_json_safe(r)) + "\n" for r in rows)
    return atomic_write_text(path, text)


def write_partition(
    path: str | os.PathLike[str], classes: Iterable[Any], counts: list[list[int]]
) -> Path:
    """Write ``partition.json`` atomically: the class names and one row of per-class
    training counts per client, a client per line (1,000 x 100 counts stay readable)."""
    names = json.dumps([str(c) for c in classes])
    rows = ",\n    ".join(map(json.dumps, counts))
    return atomic_write_text(
        path, f'{{\n  "classes": {names},\n  "counts": [\n    {rows}\n  ]\n}}\n'
    )


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a missing file reads as no rows.

    A last line cut short by a crash during an append (see :func:`append_jsonl`) is
    ignored; a bad line anywhere else is an error.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise DamagedFile(f"{path} is damaged at line {number} ({exc})") from None
    return rows


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append rows with one ``write`` to an ``O_APPEND`` file, then fsync.

    For logs that grow every round (rewriting them would cost O(rounds^2)): a crash can
    at worst cut the last line short, which :func:`read_jsonl` skips.
    """
    data = "".join(json.dumps(_json_safe(r)) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read a JSON file, or None when it does not exist.

    Raises
    ------
    DamagedFile
        If it is not JSON (cut short or edited by hand).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{path} is damaged ({exc})") from None


@functools.cache  # summary.json is rewritten at every checkpoint
def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("fedimb", "torch", "torchvision", "flwr", "numpy", "ray"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunRecorder:
    """Writes a run's per-round rows and its summary into its results directory.

    A run killed at any moment leaves the files of its last completed write (at worst a
    cut last line of clients.jsonl, which :func:`read_jsonl` skips). On resume the rows
    after the checkpointed round are dropped: they will be recomputed identically.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        seed: int,
        num_rounds: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self.seed, self.num_rounds = seed, num_rounds
        self.extra = dict(extra or {})
        self.previous_wall = 0.0

    def start_fresh(self) -> None:
        """Drop the logs of an earlier attempt in this folder (a fresh start, not a resume)."""
        for name in (METRICS_FILE, CLIENTS_FILE, CHECKPOINT_FILE, CURVES_FILE):
            (self.out_dir / name).unlink(missing_ok=True)

    def resume_from(self, checkpoint_round: int) -> None:
        """Keep only what was recorded up to ``checkpoint_round``."""
        self.rounds = [
            r for r in read_jsonl(self.out_dir / METRICS_FILE) if r["round"] <= checkpoint_round
        ]
        clients = read_jsonl(self.out_dir / CLIENTS_FILE)
        write_jsonl(
            self.out_dir / CLIENTS_FILE, [r for r in clients if r["round"] <= checkpoint_round]
        )
        old = read_json(self.out_dir / SUMMARY_FILE) or {}
        self.previous_wall = float(old.get("wall_time_s") or 0.0)

    def add_round(self, row: dict[str, Any]) -> None:
        """Record one evaluated round and rewrite metrics.jsonl."""
        self.rounds.append(row)
        write_jsonl(self.out_dir / METRICS_FILE, self.rounds)

    def add_clients(self, rows: list[dict[str, Any]]) -> None:
        """Append a round's per-client training metrics to clients.jsonl."""
        append_jsonl(self.out_dir / CLIENTS_FILE, rows)

    def summary(self, status: str, wall_time_s: float, error: str | None = None) -> dict[str, Any]:
        """Write summary.json from what has been recorded; return it."""
        evaluated = [r for r in self.rounds if r.get("balanced_error") is not None]
        best = min(evaluated, key=lambda r: r["balanced_error"], default=None)
        last = evaluated[-1] if evaluated else None
        summary = {
            "status": status,
            "final_balanced_error": last["balanced_error"] if last else None,
            "final_accuracy": last["accuracy"] if last else None,
            "best_balanced_error": best["balanced_error"] if best else None,
            "best_round": best["round"] if best else None,
            "num_rounds": self.num_rounds,
            "rounds_completed": max((r["round"] for r in self.rounds), default=0),
            "failures_total": sum(int(r.get("failures", 0)) for r in self.rounds),
            "wall_time_s": self.previous_wall + wall_time_s,
            "seed": self.seed,
            "defaults": DEFAULTS_VERSION,
            **self.extra,
            "versions": dict(package_versions()),
        }
        if error is not None:
            summary["error"] = error
        atomic_write_json(self.out_dir / SUMMARY_FILE, summary)
        return summary


# Bumped when a default changes what a run computes, so that a run is not continued (or a
# sweep completed) under other defaults than it began with. 2: every loss takes the logit
# scale s (30 on a cosine head, 1 on a linear one: LDAM's linear-head runs had 30);
# balanced-softmax and logit-adjusted default to missing = "present" (was "clamp").
# 3: dirichlet caps a client's share as NIID-Bench does (partition.balance = true); with
# local momentum, SCAFFOLD's c_i divides by the effective steps and FedNova takes the
# clients' momentum (it assumed plain SGD unless strategy.momentum was set).
# 4: augmentation crops the raw image (its padding is black, as torchvision's RandomCrop
# before Normalize), not the normalised one (padded with the channel mean).
DEFAULTS_VERSION = 4


def new_run_dir(config: Any, root: str | os.PathLike[str] = "results") -> Path:
    """A new folder ``results/<time>-<loss>-<strategy>-s<seed>`` for a run, created here
    so that runs started in the same second each get their own (``-2``, ``-3``, ...)."""
    import time

    stem = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stem}-{config.loss.name}-{config.strategy.name}-s{config['seed']}".replace(":", "_")
    Path(root).mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = Path(root) / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"no free folder name {name}-N under {root}")
