"""Tables and plots across runs: which loss helps under which split, with which strategy.

:func:`build_report` reads results folders only (it never re-runs anything) and writes,
into the folder it is given:

- ``report.csv`` / ``report.md``: one row per group of runs that differ only by seed,
  with mean ± std over seeds of the final and best global balanced error, the final
  model's worst-class error (and, on long tails, its many/medium/few-shot errors), rounds to
  reach a target error, wall time and the number of failed runs; sorted by final
  balanced error, the best row of each split (the ``partition.*`` keys) marked ``*``;
- ``curves.png``: balanced error vs round, one panel per split, one line per group
  (mean over seeds, band = min..max over seeds);
- ``per_class.png``: per-class error of each group's final global model (mean over seeds).

It accepts three kinds of folder:

- a sweep folder (has ``sweep.json``): cells and their overrides come from it, and the
  groups are the grid keys other than ``seed``;
- one run folder (has ``summary.json``, ``metrics.jsonl`` or ``config.toml``);
- a folder of run folders: the groups are the config keys whose values differ between
  the runs' ``config.toml`` files (ignoring ``seed`` and output paths).

Run it as ``fedimb report <dir>``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.config import flatten
from fedimb.metrics import SHOT_GROUPS
from fedimb.results import (
    CONFIG_FILE,
    CURVES_FILE,
    METRICS_FILE,
    PARTITION_FILE,
    SUMMARY_FILE,
    SWEEP_FILE,
    DamagedFile,
    atomic_write_bytes,
    atomic_write_text,
    check_target_error,
    finite_or_none,
    read_json,
    read_jsonl,
)

log = logging.getLogger(__name__)

# Column titles of the shot groups in report.md.
SHOT_TITLES = {
    "many_shot_error": "many-shot",
    "medium_shot_error": "medium-shot",
    "few_shot_error": "few-shot",
}

REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
CURVES_PNG = CURVES_FILE
PER_CLASS_PNG = "per_class.png"

# Keys that say "which split": their groups form the panels and the "best within" sets.
SPLIT_PREFIXES = ("partition.",)
# Shown as labels when nothing varies between runs (a single run, or seeds only).
HEADLINE_KEYS = ("dataset", "partition.name", "loss.name", "strategy.name")
# Keys that differ between runs without defining a different experiment: the seed is
# the replicate, the others are where a run was written.
_PER_RUN_KEY = re.compile(r"(^|\.)(seed|out-dir)$")


# --------------------------------------------------------------------------- runs


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


# --------------------------------------------------------------------------- table


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
FEW_CLASSES = 4


def class_columns(rows: list[GroupStats]) -> list[str]:
    """Names of the per-class error columns: one per class where every row has the same
    few classes (the names the runs recorded, else ``class i``); none otherwise."""
    widths = {len(r.per_class) for r in rows if r.per_class}
    if len(widths) != 1 or not 0 < (width := widths.pop()) <= FEW_CLASSES:
        return []
    return _class_names(rows, width) or [f"class {i}" for i in range(width)]


def _row_per_class(row: GroupStats, width: int) -> list[tuple[float, float]]:
    return list(row.per_class) if len(row.per_class) == width else [(math.nan, math.nan)] * width


def _csv_num(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def _write_csv(path: Path, rows: list[GroupStats], keys: list[str], target: float | None) -> Path:
    header = [
        *keys,
        "n",
        "failed",
        "incomplete",
        "final_balanced_error_mean",
        "final_balanced_error_std",
        "best_balanced_error_mean",
        "best_balanced_error_std",
    ]
    if target is not None:
        header += ["rounds_to_target_mean", "reached_target"]
    header += ["wall_time_s_mean", "best_in_split"]
    header += [  # added later: last, so that columns read by position keep their place
        "final_worst_class_error_mean",
        "final_worst_class_error_std",
        "final_few_shot_error_mean",
        "final_few_shot_error_std",
        "final_many_shot_error_mean",
        "final_many_shot_error_std",
        "final_medium_shot_error_mean",
        "final_medium_shot_error_std",
    ]
    classes = class_columns(rows)
    header += [f"final_error_{name}_{stat}" for name in classes for stat in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = [_display(r.label.get(k)) for k in keys]
        line += [
            r.n,
            r.failed,
            r.incomplete,
            _csv_num(r.final_mean),
            _csv_num(r.final_std),
            _csv_num(r.best_mean),
            _csv_num(r.best_std),
        ]
        if target is not None:
            line += [_csv_num(r.rounds_to_target), r.reached_target]
        line += [_csv_num(r.wall_mean), int(r.best_in_split)]
        shots = [r.shots[k] for k in ("few_shot_error", "many_shot_error", "medium_shot_error")]
        line += [_csv_num(v) for v in (r.worst_mean, r.worst_std, *itertools.chain(*shots))]
        line += [_csv_num(v) for v in itertools.chain(*_row_per_class(r, len(classes)))]
        writer.writerow(line)
    return atomic_write_text(path, buf.getvalue())


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _rounds_cell(row: GroupStats) -> str:
    if row.reached_target == 0:
        return "-"
    text = f"{row.rounds_to_target:.1f}"
    return text if row.reached_target == row.n else f"{text} ({row.reached_target}/{row.n})"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_header(header: list[str]) -> list[str]:
    """A Markdown table's title row and its rule."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]


def markdown_table(
    rows: list[GroupStats], keys: list[str], target: float | None, title: str = "Report"
) -> str:
    """The report as Markdown: a table plus notes (what ``*`` means, failed runs)."""
    header = ["", *keys, "n", "failed"]
    show_incomplete = any(r.incomplete for r in rows)
    if show_incomplete:
        header.append("incomplete")
    header += ["final BE", "best BE", "worst class"]
    # Shot groups only on a long tail: with balanced data every class is many-shot.
    shown = [k for k in SHOT_GROUPS if any(not math.isnan(r.shots[k][0]) for r in rows)]
    shown = shown if shown != ["many_shot_error"] else []
    header += [SHOT_TITLES[k] for k in shown]
    classes = class_columns(rows)
    header += [f"error {_md_escape(name)}" for name in classes]
    if target is not None:
        header.append(f"rounds to BE ≤ {target:g}")
    header.append("wall time (s)")
    lines = [f"# {title}", "", *_md_header(header)]
    for r in rows:
        cells = ["*" if r.best_in_split else ""]
        cells += [_md_escape(_display(r.label.get(k))) for k in keys]
        cells += [str(r.n), str(r.failed)]
        if show_incomplete:
            cells.append(str(r.incomplete))
        cells += [_pm(r.final_mean, r.final_std), _pm(r.best_mean, r.best_std)]
        cells.append(_pm(r.worst_mean, r.worst_std))
        cells += [_pm(*r.shots[k]) for k in shown]
        cells += [_pm(*v) for v in _row_per_class(r, len(classes))]
        if target is not None:
            cells.append(_rounds_cell(r))
        cells.append("-" if math.isnan(r.wall_mean) else f"{r.wall_mean:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    split = split_keys_of(keys)
    within = f"its split ({', '.join(split)})" if split else "the table"
    lines += [
        "",
        "BE = global balanced error (mean per-class error on the balanced test set); "
        "mean ± sample std (ddof=1) over the completed seeds. Best BE: the lowest over "
        "the evaluated rounds, picked on that same test set (no validation split), so an "
        "optimistic figure; final BE is the one to compare. Worst class: the final "
        "model's largest per-class error. Many/medium/few-shot (long tails): its mean "
        "error over the classes with more than long-tail.many-shot-above training "
        "samples, between, and fewer than long-tail.few-shot-below (100 and 20 unless "
        "the runs' configs say otherwise)."
        + (" Error <class>: the final model's error on that class." if classes else ""),
        f"`*` = lowest mean final BE within {within}.",
    ]
    bad = [run for r in rows for run in r.runs if not run.completed]
    if bad:
        lines += ["", "## Failed or incomplete runs", ""]
        for run in bad:
            error = str(run.summary.get("error") or "").strip().splitlines()
            detail = f": {_md_escape(error[-1][:200])}" if error else ""
            lines.append(f"- `{run.name}` ({run.status}){detail}")
    return "\n".join(lines) + "\n"


def reference_table(rows: list[GroupStats], reference: dict[str, Any]) -> str:
    """Markdown: each method's final errors (mean over seeds) beside the published ones
    ('' without a reference)."""
    published = {k: v for k, v in reference.items() if k != "source"}
    if not published:
        return ""
    names = class_columns(rows)
    columns = ["balanced", *(n for n in names if any(n in v for v in published.values()))]
    header = ["method"] + [f"{c} (fedimb / published / Δ)" for c in columns]
    source = reference.get("source", "reference")
    lines = [f"## Beside the published numbers ({source})", "", *_md_header(header)]
    for r in rows:
        label = r.label.get("method")
        if label not in published:
            continue
        ours = {"balanced": r.final_mean}
        ours.update({n: v[0] for n, v in zip(names, _row_per_class(r, len(names)), strict=True)})
        cells = [_md_escape(str(label))]
        for c in columns:
            mine, theirs = ours.get(c, math.nan), published[label].get(c, math.nan)
            gap = mine - theirs
            cells.append(
                " / ".join("-" if math.isnan(v) else f"{100 * v:.2f}" for v in (mine, theirs))
                + ("" if math.isnan(gap) else f" / {100 * gap:+.2f}")
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Errors in %, fedimb's the mean final error over the completed seeds."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def _save_figure(fig: Any, path: Path) -> Path:
    """PNG bytes in memory, then an atomic write: a reader never sees half a picture."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _placeholder(path: Path, message: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2))
    fig.text(0.5, 0.5, message, ha="center", va="center")
    return _save_figure(fig, path)


def _series_band(runs: Sequence[RunRecord]) -> tuple[int, np.ndarray, np.ndarray] | None:
    """Balanced error over runs: (number of runs, rounds, [mean, min, max] per round).

    Failed runs are left out; a still-running run counts for the rounds it has, so a
    report built mid-run still shows its curve.
    """
    curves = [r.curve() for r in runs if r.status != "failed"]
    curves = [c for c in curves if c]
    if not curves:
        return None
    rounds = sorted(set().union(*curves))
    values = [[c[t] for c in curves if t in c] for t in rounds]
    stats = np.array([[np.mean(v), np.min(v), np.max(v)] for v in values])
    return len(curves), np.array(rounds), stats.T


# Line styles after tab10's ten colours, then markers after those 40 series.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = (None, "o", "s", "^", "x")


def series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour and line style per series name, in the given order (the same
    name gets the same style in every panel)."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    styles: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(dict.fromkeys(names)):
        styles[name] = {
            "color": colours[i % len(colours)],
            "linestyle": LINE_STYLES[(i // len(colours)) % len(LINE_STYLES)],
            "marker": MARKERS[(i // (len(colours) * len(LINE_STYLES))) % len(MARKERS)],
        }
    return styles


def plot_curves(rows: list[GroupStats], keys: list[str], path: Path) -> Path:
    """Write :func:`curves_figure` (or a placeholder without per-round metrics)."""
    fig = curves_figure(rows, keys)
    return (
        _placeholder(path, "no per-round metrics to plot")
        if fig is None
        else _save_figure(fig, path)
    )


def curves_figure(rows: list[GroupStats], keys: list[str]) -> Any:
    """Balanced error vs round: one panel per split, one line per group (band: min..max);
    one legend for all panels, outside them. None without per-round metrics."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    split = split_keys_of(keys)
    series_keys = [k for k in keys if k not in split]
    panels: dict[tuple[Any, ...], list[GroupStats]] = {}
    for row in sorted(rows, key=lambda r: r.order):
        panels.setdefault(row.split, []).append(row)
    bands = {id(r): _series_band(r.runs) for r in rows}
    if not any(b is not None for b in bands.values()):
        return None

    def series_name(row: GroupStats) -> str:
        name = ", ".join(_display(row.label.get(k)) for k in series_keys) or "mean"
        return textwrap.shorten(name, 60, placeholder=" ...")

    ordered = sorted(rows, key=lambda r: r.order)
    styles = series_styles([series_name(r) for r in ordered if bands[id(r)] is not None])
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_cols = 1 + len(styles) // 40
    legend_height = 0.8 + 0.17 * math.ceil(len(styles) / legend_cols)  # inches at size 7
    fig = Figure(
        figsize=(4.8 * ncols + 2.5 * legend_cols, max(3.6 * nrows, legend_height)),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    counts, handles = set(), {}
    for ax, (split_value, members) in zip(axes.flat, panels.items(), strict=False):
        for row in members:
            band = bands[id(row)]
            if band is None:
                continue
            count, rounds, (mean, low, high) = band
            counts.add(count)
            name = series_name(row)
            style = dict(styles[name])
            if style["marker"] is None and len(rounds) < 30:
                style["marker"] = "."
            (line,) = ax.plot(rounds, mean, label=name, markersize=4, **style)
            ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
            handles.setdefault(name, line)
        title = ", ".join(f"{k}={_display(v)}" for k, v in zip(split, split_value, strict=True))
        ax.set_title(title or "all runs", fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("global balanced error")
    if handles:  # beside the panels: it never covers a line, and the layout makes room
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside right upper",
            fontsize=7,
            title=", ".join(series_keys) or None,
            title_fontsize=7,
            ncols=legend_cols,
        )
    runs = "-".join(str(n) for n in sorted({min(counts), max(counts)})) if counts else "0"
    fig.suptitle(
        f"Balanced error vs round (line: mean over {runs} run(s), band: min..max)",
        fontsize=10,
        x=0.02,
        ha="left",  # clear of the legend's column
    )
    return fig


def plot_run_curves(run_dir: str | Path, metrics: list[dict[str, Any]] | None = None) -> Path:
    """Write a single run's ``curves.png``: balanced (and worst-class) error over rounds,
    and each class's error over rounds, named from its ``partition.json``. ``metrics``:
    its metrics.jsonl rows, if read already."""
    run_dir = Path(run_dir)
    if metrics is None:
        metrics = read_jsonl(run_dir / METRICS_FILE)
    rows = [r for r in metrics if r.get("balanced_error") is not None and "round" in r]
    path = run_dir / CURVES_PNG
    fig = run_curves_figure(rows, _recorded_classes(run_dir))
    return (
        _placeholder(path, "no per-round metrics to plot")
        if fig is None
        else _save_figure(fig, path)
    )


def _recorded_classes(run_dir: Path) -> list[str] | None:
    try:
        recorded = read_json(run_dir / PARTITION_FILE) or {}
    except (OSError, ValueError):  # a damaged file must not stop the picture
        return None
    classes = recorded.get("classes") if isinstance(recorded, dict) else None
    return [str(c) for c in classes] if isinstance(classes, list) else None


# Past this many classes the per-class panel draws its lines without a legend.
LEGEND_MAX_CLASSES = 40


def run_curves_figure(rows: list[dict[str, Any]], classes: list[str] | None) -> Any:
    """Two panels over the rounds of one run's evaluated ``rows`` (metrics.jsonl): the
    balanced and worst-class error; each class's error. None without rows."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not rows:
        return None
    rounds = [int(r["round"]) for r in rows]
    width = max((len(r.get("per_class_error") or ()) for r in rows), default=0)
    names = classes if classes and len(classes) == width else [str(c) for c in range(width)]
    legend = 0 < width <= LEGEND_MAX_CLASSES
    fig = Figure(figsize=(11.0 + 1.5 * legend, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    marker = "." if len(rounds) < 30 else None
    left.plot(rounds, [_num(r["balanced_error"]) for r in rows], marker=marker, label="balanced")
    worst = [_num(r.get("worst_class_error")) for r in rows]
    left.plot(rounds, worst, linestyle="--", marker=marker, label="worst class")
    left.legend(fontsize=7, loc="upper right")
    left.set_title("Global balanced error", fontsize=9)
    left.set_ylabel("error")
    styles = series_styles(names)
    for j, name in enumerate(names):
        values = [_class_error(r, j) for r in rows]
        style = {**styles[name], "marker": styles[name]["marker"] or marker}
        right.plot(rounds, values, label=name, markersize=3, linewidth=1, **style)
    right.set_title("Per-class error", fontsize=9)
    if legend:
        fig.legend(
            *right.get_legend_handles_labels(),
            loc="outside right upper",
            fontsize=7,
            title="class",
            title_fontsize=7,
            ncols=1 + width // 20,
        )
    for ax in (left, right):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    return fig


def _class_error(row: dict[str, Any], j: int) -> float:
    """Class ``j``'s error in a metrics row (NaN where the row has none)."""
    values = row.get("per_class_error") or []
    return _num(values[j]) if j < len(values) else math.nan


def _per_class_matrix(rows: list[GroupStats]) -> tuple[list[GroupStats], np.ndarray] | None:
    """Groups with per-class data and their mean final per-class error (NaN-padded)."""
    kept, means = [], []
    for row in rows:
        vectors = [v for v in (r.final_per_class() for r in row.runs if r.completed) if v]
        if not vectors:
            continue
        width = max(len(v) for v in vectors)
        padded = np.full((len(vectors), width), np.nan)
        for i, v in enumerate(vectors):
            padded[i, : len(v)] = v
        kept.append(row)
        # nanmean over seeds; an all-NaN column (class missing in every seed) stays NaN.
        with np.errstate(all="ignore"):
            counts = np.sum(~np.isnan(padded), axis=0)
            sums = np.nansum(padded, axis=0)
            means.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
    if not kept:
        return None
    width = max(len(m) for m in means)
    matrix = np.full((len(kept), width), np.nan)
    for i, m in enumerate(means):
        matrix[i, : len(m)] = m
    return kept, matrix


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


HEATMAP_CELL_IN, HEATMAP_MAX_WIDTH_IN = 0.45, 24.0


def plot_per_class(rows: list[GroupStats], keys: list[str], path: Path) -> Path:
    """Write :func:`per_class_figure` (or a placeholder without per-class metrics)."""
    fig = per_class_figure(rows, keys)
    if fig is None:
        return _placeholder(path, "no per-class metrics of a completed run")
    return _save_figure(fig, path)


def per_class_figure(rows: list[GroupStats], keys: list[str]) -> Any:
    """Heatmap: rows = groups (table order), columns = classes, value = final error, shown
    in each cell where it fits. None without per-class metrics of a completed run."""
    from matplotlib.figure import Figure

    found = _per_class_matrix(rows)
    if found is None:
        return None
    kept, matrix = found
    n_rows, n_cls = matrix.shape
    labels = [r.label_text(keys) for r in kept]
    # Room for the row labels (~0.06 in per character at font size 7) plus the cells.
    label_width = 0.06 * max(len(t) for t in labels)
    # Numbers in the cells where a cell of 0.45 in (a "0.93" at font size 6) still fits
    # the widest figure; the figure grows with the rows, so their count never forbids it.
    annotate = 2.5 + label_width + HEATMAP_CELL_IN * n_cls <= HEATMAP_MAX_WIDTH_IN
    cell_width = HEATMAP_CELL_IN if annotate else 0.12
    width = min(HEATMAP_MAX_WIDTH_IN, 2.5 + label_width + max(3.0, cell_width * n_cls))
    fig = Figure(figsize=(width, 1.8 + 0.4 * n_rows), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_yticks(range(n_rows), labels, fontsize=7)
    step = max(1, n_cls // 25)
    names = _class_names(kept, n_cls)
    ticks = range(0, n_cls, step)
    if names is None:
        ax.set_xticks(ticks)
    else:  # upright while they are short (CIFAR's), else slanted
        long = max(len(n) for n in names) > 3
        ax.set_xticks(
            ticks,
            [names[i] for i in ticks],
            rotation=45 if long else 0,
            ha="right" if long else "center",
            fontsize=7,
        )
    ax.set_xlabel("class")
    if annotate:
        for (i, j), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > 0.6 else "white",
                )
    fig.colorbar(image, ax=ax, label="error")
    ax.set_title("Per-class error of the final global model (mean over seeds)", fontsize=9)
    return fig


# --------------------------------------------------------------------------- entry points


def build_report(results_dir: str | Path, *, target_error: float | None = None) -> dict[str, Path]:
    """Write report.csv, report.md, curves.png and per_class.png into ``results_dir``.

    Parameters
    ----------
    results_dir : str or Path
        A sweep folder, one run folder, or a folder of run folders.
    target_error : float, optional
        Balanced error for the "rounds to reach target" column; default: the sweep's
        ``target-error`` (from sweep.json), else no such column.

    Returns
    -------
    dict
        ``{"csv": ..., "md": ..., "curves": ..., "per_class": ...}`` -> written paths.

    Raises
    ------
    ValueError
        If ``results_dir`` holds no run or ``target_error`` is outside [0, 1].
    """
    target = check_target_error(target_error, "target_error")
    runset = load_runs(results_dir)
    if target is None:
        target = check_target_error(runset.target_error)
    rows = summarize(runset, target)
    keys = _label_keys(runset)
    root = runset.root
    title = f"Report: {runset.name or root.resolve().name}"
    return {
        "csv": _write_csv(root / REPORT_CSV, rows, keys, target),
        "md": atomic_write_text(
            root / REPORT_MD,
            markdown_table(rows, keys, target, title)
            + ("\n" + ref if (ref := reference_table(rows, runset.reference)) else ""),
        ),
        "curves": (
            # one run: its error and each class's over the rounds
            plot_run_curves(root, runset.runs[0].metrics)
            if runset.kind == "single"
            else plot_curves(rows, keys, root / CURVES_PNG)
        ),
        "per_class": plot_per_class(rows, keys, root / PER_CLASS_PNG),
    }
