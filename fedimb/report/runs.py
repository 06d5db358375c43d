"""Runs read back from results folders: their config, summary and metrics.

:func:`load_runs` accepts a sweep folder (``sweep.json``), one run folder, or a folder
of run folders, and returns a :class:`RunSet`: the runs and the config keys that tell
their groups apart. It only reads; a damaged or half-written file is reported, not fatal.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimb.config import flatten
from fedimb.results import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    DamagedFile,
    finite_or_none,
    read_json,
    read_jsonl,
)

log = logging.getLogger(__name__)

# Keys that differ between runs without defining a different experiment: the seed is
# the replicate, the others are where a run was written.
_PER_RUN_KEY = re.compile(r"(^|\.)(seed|out-dir)$")


def _hashable(value: Any) -> Any:
    """Lists -> tuples (recursively) so config values can be dict keys."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


def _display(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return json.dumps(list(value), separators=(",", ":"))
    return str(value)


def _num(value: Any) -> float:
    """A finite float, or NaN for None / non-numbers / inf (JSON writes NaN as null)."""
    number = finite_or_none(value)
    return math.nan if number is None else number


@dataclass(frozen=True)
class RunRecord:
    """One run as read from its folder (any file may be missing).

    ``params`` are the dotted config keys that identify the run: a sweep cell's
    overrides, or the flattened ``config.toml`` otherwise.
    """

    name: str
    path: Path
    params: dict[str, Any]
    config: dict[str, Any]
    status: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def curve(self) -> dict[int, float]:
        """Round -> balanced error of the global model (finite values only)."""
        out = {}
        for row in self.metrics:
            err = _num(row.get("balanced_error"))
            if "round" in row and not math.isnan(err):
                out[int(row["round"])] = err
        return out

    def final_error(self) -> float:
        value = _num(self.summary.get("final_balanced_error"))
        if math.isnan(value) and self.metrics:
            value = _num(self.metrics[-1].get("balanced_error"))
        return value

    def best_error(self) -> float:
        value = _num(self.summary.get("best_balanced_error"))
        curve = self.curve()
        if math.isnan(value) and curve:
            value = min(curve.values())
        return value

    def wall_time(self) -> float:
        value = _num(self.summary.get("wall_time_s"))
        if math.isnan(value) and self.metrics:
            value = _num(self.metrics[-1].get("elapsed_s"))
        return value

    def rounds_to(self, target: float) -> float | None:
        """First round whose balanced error is <= ``target``; inf if never; None if unknown."""
        curve = self.curve()
        if not curve:
            return None
        hits = [r for r, err in sorted(curve.items()) if err <= target]
        return float(hits[0]) if hits else math.inf

    def final_metric(self, key: str) -> float:
        """``key`` of the last round that reports it (NaN where none does)."""
        for row in reversed(self.metrics):
            value = _num(row.get(key))
            if not math.isnan(value):
                return value
        return math.nan

    def final_per_class(self) -> list[float] | None:
        """Per-class error of the last evaluated model, or None without such a row."""
        for row in reversed(self.metrics):
            values = row.get("per_class_error")
            if isinstance(values, list) and values:
                return [_num(v) for v in values]
        return None


@dataclass(frozen=True)
class RunSet:
    """The runs under one results folder and how to group them.

    ``kind`` is "sweep", "runs" (a folder of run folders) or "single"; ``group_keys``
    are the dotted keys whose values define a group (never ``seed``).
    """

    root: Path
    kind: str
    runs: list[RunRecord]
    group_keys: list[str]
    target_error: float | None = None
    name: str | None = None
    """A sweep's name (sweep.json), for the report's title."""
    reference: dict[str, Any] = field(default_factory=dict)
    """A sweep's published errors by method label, and their ``source``."""


def _is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in (SUMMARY_FILE, METRICS_FILE, CONFIG_FILE))


def _readable(read: Callable[[Path], Any], path: Path, empty: Any) -> Any:
    """``read(path)``, or ``empty`` for a missing file, and for a damaged one (said in a
    warning: one run's file must not stop a report of many)."""
    try:
        return read(path) or empty
    except DamagedFile as exc:
        log.warning("%s: the report leaves it out", exc)
        return empty


def _read_config(path: Path) -> dict[str, Any]:
    """Flattened config.toml, or {} when missing or unreadable (a run that died early)."""
    try:
        return flatten(tomllib.loads((path / CONFIG_FILE).read_text()))
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return {}


def _read_run(path: Path, params: dict[str, Any] | None = None) -> RunRecord:
    config = _read_config(path)
    summary = _readable(read_json, path / SUMMARY_FILE, {})
    metrics = _readable(read_jsonl, path / METRICS_FILE, [])
    metrics = sorted((m for m in metrics if "round" in m), key=lambda m: m["round"])
    if summary.get("status"):
        status = str(summary["status"])
    else:
        status = "running" if metrics else "missing"
    return RunRecord(
        name=path.name,
        path=path,
        params=dict(config if params is None else params),
        config=config,
        status=status,
        summary=summary,
        metrics=metrics,
    )


def _varying_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs (first-seen order), minus per-run keys."""
    with_config = [r for r in runs if r.config]
    keys: list[str] = []
    for run in with_config:
        keys.extend(k for k in run.config if k not in keys)
    return [
        k
        for k in keys
        if not _PER_RUN_KEY.search(k)
        and len({json.dumps(r.config.get(k), sort_keys=True) for r in with_config}) > 1
    ]


def load_runs(results_dir: str | Path) -> RunSet:
    """Find and read the runs under ``results_dir`` (a sweep, one run, or run folders).

    Raises
    ------
    ValueError
        If ``results_dir`` is not a folder or holds no run.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ValueError(f"results_dir {str(root)!r} is not a folder")
    sweep = read_json(root / SWEEP_FILE)
    if sweep is not None:
        cells = sweep.get("cells", [])
        definition = sweep.get("sweep", {})
        # A method's label is a group key of its own (the keys it sets are not).
        labels = [{"method": c["method"]} if "method" in c else {} for c in cells]
        runs = [
            _read_run(root / c["name"], params={**c.get("overrides", {}), **label})
            for c, label in zip(cells, labels, strict=True)
        ]
        # A cell that wrote nothing yet: record what sweep.json says (pending, interrupted).
        runs = [
            r if r.status != "missing" else _with_status(r, c.get("status", "pending"))
            for r, c in zip(runs, cells, strict=True)
        ]
        grid_keys = [k for k in definition.get("grid", {}) if not _PER_RUN_KEY.search(k)]
        group_keys = (["method"] if definition.get("methods") else []) + grid_keys
        target = definition.get("target_error")
        reference = definition.get("reference") or {}
        return RunSet(root, "sweep", runs, group_keys, target, definition.get("name"), reference)
    if _is_run_dir(root):
        return RunSet(root, "single", [_read_run(root)], [])
    runs = [_read_run(p) for p in sorted(root.iterdir()) if p.is_dir() and _is_run_dir(p)]
    if not runs:
        raise ValueError(
            f"results_dir {str(root)!r} holds no run: expected {SWEEP_FILE}, a run folder "
            f"({SUMMARY_FILE}/{METRICS_FILE}/{CONFIG_FILE}) or folders of runs"
        )
    return RunSet(root, "runs", runs, _varying_keys(runs))


def _with_status(run: RunRecord, status: str) -> RunRecord:
    return RunRecord(run.name, run.path, run.params, run.config, status, run.summary, run.metrics)
