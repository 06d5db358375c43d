"""The report's plots: balanced error by round (``curves.png``), one run's curves with
each class's error, and each group's per-class error (``per_class.png``).

matplotlib is imported inside the functions, so reading runs and writing tables does
not load it.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.report.runs import RunRecord, _display, _num
from fedimb.report.summary import GroupStats, _class_names, split_keys_of
from fedimb.results import (
    CURVES_FILE,
    METRICS_FILE,
    PARTITION_FILE,
    atomic_write_bytes,
    read_json,
    read_jsonl,
)

CURVES_PNG = CURVES_FILE
PER_CLASS_PNG = "per_class.png"


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
