"""Runs grouped by configuration, with seeds as replicates: :func:`summarize`.

Each :class:`GroupStats` holds mean and std over seeds of the final and best balanced
error, the worst-class and shot-group errors and the rounds to a target error; the
best group of each split (the ``partition.*`` keys) is marked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedimb.metrics import SHOT_GROUPS
from fedimb.report.runs import RunRecord, RunSet, _display, _hashable
from fedimb.results import PARTITION_FILE, read_json

# Keys that say "which split": their groups form the panels and the "best within" sets.
SPLIT_PREFIXES = ("partition.",)
# Shown as labels when nothing varies between runs (a single run, or seeds only).
HEADLINE_KEYS = ("dataset", "partition.name", "loss.name", "strategy.name")


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1) over seeds; NaN with fewer than two."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


@dataclass(frozen=True)
class GroupStats:
    """One table row: runs that share every group key value (they differ by seed).

    Means and stds are over the group's completed runs; std is the sample std (ddof=1).
    ``rounds_to_target`` is the mean over the runs that reached the target, and
    ``reached_target`` how many did (of ``n`` completed runs).
    """

    label: dict[str, Any]
    split: tuple[Any, ...]
    series: tuple[Any, ...]
    runs: list[RunRecord]
    n: int
    failed: int
    incomplete: int
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float
    worst_mean: float
    worst_std: float
    shots: dict[str, tuple[float, float]]
    """Mean and std of the final many/medium/few-shot errors (``SHOT_GROUPS`` keys)."""
    wall_mean: float
    rounds_to_target: float
    reached_target: int
    per_class: tuple[tuple[float, float], ...] = ()
    """Mean and std of each class's final error (empty if the runs disagree on classes)."""
    best_in_split: bool = False
    order: int = field(default=0, compare=False)

    def label_text(self, keys: Sequence[str] | None = None) -> str:
        keys = list(self.label) if keys is None else keys
        return ", ".join(f"{k}={_display(self.label.get(k))}" for k in keys) or "all runs"


def _label_keys(runset: RunSet) -> list[str]:
    if runset.group_keys:
        return list(runset.group_keys)
    configs = [r.config for r in runset.runs if r.config]
    return [k for k in HEADLINE_KEYS if configs and k in configs[0]]


def _group_stats(
    label: dict[str, Any], runs: list[RunRecord], split_keys: list[str], target: float | None
) -> GroupStats:
    done = [r for r in runs if r.completed]
    finals = [v for v in (r.final_error() for r in done) if not math.isnan(v)]
    bests = [v for v in (r.best_error() for r in done) if not math.isnan(v)]
    worsts = [v for v in (r.final_metric("worst_class_error") for r in done) if not math.isnan(v)]
    shots = {}
    for key in SHOT_GROUPS:
        values = [v for v in (r.final_metric(key) for r in done) if not math.isnan(v)]
        shots[key] = (_mean(values), _std(values))
    walls = [v for v in (r.wall_time() for r in done) if not math.isnan(v)]
    vectors = [v for v in (r.final_per_class() for r in done) if v]
    per_class: tuple[tuple[float, float], ...] = ()
    if vectors and len({len(v) for v in vectors}) == 1:
        columns = [[v for v in col if not math.isnan(v)] for col in zip(*vectors, strict=True)]
        per_class = tuple((_mean(c), _std(c)) for c in columns)
    reached: list[float] = []
    if target is not None:
        hits = [r.rounds_to(target) for r in done]
        reached = [h for h in hits if h is not None and math.isfinite(h)]
    series_keys = [k for k in label if k not in split_keys]
    return GroupStats(
        label=label,
        split=tuple(_hashable(label.get(k)) for k in split_keys),
        series=tuple(_hashable(label.get(k)) for k in series_keys),
        runs=runs,
        n=len(done),
        failed=sum(r.status == "failed" for r in runs),
        incomplete=sum(r.status not in ("completed", "failed") for r in runs),
        final_mean=_mean(finals),
        final_std=_std(finals),
        best_mean=_mean(bests),
        best_std=_std(bests),
        worst_mean=_mean(worsts),
        worst_std=_std(worsts),
        shots=shots,
        wall_mean=_mean(walls),
        rounds_to_target=_mean(reached),
        reached_target=len(reached),
        per_class=per_class,
    )


def split_keys_of(keys: Iterable[str]) -> list[str]:
    """The keys that define a data split (``partition.*``)."""
    return [k for k in keys if k.startswith(SPLIT_PREFIXES)]


def summarize(runset: RunSet, target_error: float | None = None) -> list[GroupStats]:
    """Group runs that differ only by seed and compute one table row per group.

    Rows are sorted by mean final balanced error (groups without a completed run last);
    ``best_in_split`` marks the lowest mean final error among rows of the same split.
    """
    keys = _label_keys(runset)
    grouped: dict[tuple[Any, ...], list[RunRecord]] = {}
    labels: dict[tuple[Any, ...], dict[str, Any]] = {}
    for run in runset.runs:
        source = run.params if runset.group_keys else run.config
        label = {k: source.get(k) for k in keys}
        key = tuple(_hashable(v) for v in label.values()) if runset.group_keys else ()
        grouped.setdefault(key, []).append(run)
        # Without group keys the label is descriptive only: take it from a run that has
        # a config (a run that died early has none).
        if key not in labels or (run.config and not any(labels[key].values())):
            labels[key] = label
    split_keys = split_keys_of(keys)
    rows = [
        replace(_group_stats(labels[key], runs, split_keys, target_error), order=i)
        for i, (key, runs) in enumerate(grouped.items())
    ]
    best: dict[tuple[Any, ...], GroupStats] = {}
    for row in rows:
        if not math.isnan(row.final_mean) and (
            row.split not in best or row.final_mean < best[row.split].final_mean
        ):
            best[row.split] = row
    rows = [replace(r, best_in_split=best.get(r.split) is r) for r in rows]
    return sorted(rows, key=lambda r: (math.isnan(r.final_mean), r.final_mean, r.order))


# Datasets with at most this many classes get a column per class (IMDB's neg / pos).


def _class_names(rows: list[GroupStats], n_cls: int) -> list[str] | None:
    """The class names the runs recorded in their ``partition.json``, if they all agree
    and fit the plot's columns (None otherwise: numbered columns)."""
    found = set()
    for row in rows:
        for run in row.runs:
            try:
                recorded = read_json(run.path / PARTITION_FILE) or {}
            except (OSError, ValueError):  # a damaged file must not stop the report
                continue
            classes = recorded.get("classes") if isinstance(recorded, dict) else None
            if isinstance(classes, list):
                found.add(tuple(map(str, classes)))
    if len(found) == 1 and len(names := next(iter(found))) == n_cls:
        return list(names)
    return None
