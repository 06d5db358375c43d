"""Human-readable views of a partition: a count table and a clients x classes heatmap."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

__all__ = ["format_counts", "plot_counts_heatmap", "summarize_counts"]

# Above this many classes a column per class is unreadable; rows list top classes instead.
_MAX_CLASS_COLUMNS = 20
_TOP_CLASSES = 5
# Nonzero counts spanning more than this factor (two orders) are coloured on a log scale.
LOG_SCALE_SPREAD = 100


def _check_counts(counts: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be 2-D [clients, classes], got shape {counts.shape}")
    if counts.shape[1] != len(classes):
        raise ValueError(
            f"counts has {counts.shape[1]} class columns but {len(classes)} class names given"
        )
    if counts.shape[0] == 0:
        raise ValueError("counts has no clients (0 rows)")
    return counts.astype(np.int64, copy=False)


def summarize_counts(counts: np.ndarray) -> dict[str, float]:
    """Summary numbers of a ``[clients, classes]`` count matrix.

    Returns
    -------
    dict
        ``clients``, ``samples`` and min/median/max samples per client, and min/mean/max
        classes per client (classes with a nonzero count).
    """
    counts = np.asarray(counts, dtype=np.int64)
    sizes = counts.sum(axis=1)
    held = (counts > 0).sum(axis=1)
    return {
        "clients": int(counts.shape[0]),
        "samples": int(sizes.sum()),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "classes_min": int(held.min()),
        "classes_mean": float(held.mean()),
        "classes_max": int(held.max()),
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned, space-separated columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.rjust(wd) for cell, wd in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def format_counts(counts: np.ndarray, classes: Sequence[str], max_rows: int = 20) -> str:
    """A readable table of per-client class counts, with a summary.

    With up to 20 classes there is a column per class, and a last row ``all`` with every
    client's total per class; with more, each row lists the client's largest classes.
    Beyond ``max_rows`` clients only the first rows are shown.

    Parameters
    ----------
    counts : np.ndarray
        ``[num_clients, num_classes]`` sample counts (e.g. from ``class_counts``).
    classes : sequence of str
        Class names, one per column.
    max_rows : int, default 20
        Most client rows to print (>= 1).

    Returns
    -------
    str
        The table, then lines with clients, samples per client (min/median/max) and
        classes per client (min/mean/max).
    """
    counts = _check_counts(counts, classes)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    shown = counts[:max_rows]
    sizes = shown.sum(axis=1)
    held = (shown > 0).sum(axis=1)
    if counts.shape[1] <= _MAX_CLASS_COLUMNS:
        header = ["client", *map(str, classes), "total", "#cls"]
        rows = [
            [str(i), *map(str, row), str(sizes[i]), str(held[i])] for i, row in enumerate(shown)
        ]
        per_class = counts.sum(axis=0)  # every client's, shown or not: the global profile
        rows.append(["all", *map(str, per_class), str(per_class.sum()), str((per_class > 0).sum())])
        lines = _table(header, rows)
    else:
        header = ["client", "total", "#cls"]
        rows = [[str(i), str(sizes[i]), str(held[i])] for i in range(len(shown))]
        lines = _table(header, rows)
        lines[0] += "  top classes (count)"
        for i, row in enumerate(shown):
            top = np.argsort(-row, kind="stable")[:_TOP_CLASSES]
            text = ", ".join(f"{classes[c]}({row[c]})" for c in top if row[c] > 0)
            lines[i + 1] += "  " + text
    if counts.shape[0] > max_rows:
        at = len(shown) + 1 if counts.shape[1] <= _MAX_CLASS_COLUMNS else len(lines)
        lines.insert(at, f"... {counts.shape[0] - max_rows} more clients")
    s = summarize_counts(counts)
    lines += [
        f"clients: {s['clients']}  samples: {s['samples']}",
        f"samples per client: min {s['size_min']}  median {s['size_median']:g}  "
        f"max {s['size_max']}",
        f"classes per client: min {s['classes_min']}  mean {s['classes_mean']:.2f}  "
        f"max {s['classes_max']}",
    ]
    return "\n".join(lines)


def plot_counts_heatmap(
    counts: np.ndarray, classes: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Draw a clients x classes heatmap of sample counts and save it atomically.

    Empty cells are white so the label skew stands out; the figure height grows with the
    number of clients up to a cap, and tick labels are thinned so 10 to 1000 clients (and
    up to a few hundred classes) stay readable.

    Parameters
    ----------
    counts : np.ndarray
        ``[num_clients, num_classes]`` sample counts.
    classes : sequence of str
        Class names, one per column.
    path : path
        Output image; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).

    Returns
    -------
    Path
        ``path``.
    """
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counts = _check_counts(counts, classes)
    path = Path(path)
    n_clients, n_classes = counts.shape
    width = min(max(4.0 + 0.35 * n_classes, 6.0), 24.0)
    height = min(max(2.0 + 0.25 * n_clients, 4.0), 16.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    masked = np.ma.masked_equal(counts, 0)
    cmap = _cmap()
    # Past a few hundred rows a screen pixel spans several clients: antialias rather
    # than let "nearest" drop rows at random.
    interp = "nearest" if n_clients <= 300 else "antialiased"
    nonzero = counts[counts > 0]
    # A long tail spans orders of magnitude: a log scale keeps its rare classes visible.
    spread = nonzero.size and nonzero.max() > LOG_SCALE_SPREAD * nonzero.min()
    norm = LogNorm(vmin=nonzero.min(), vmax=nonzero.max()) if spread else None
    image = ax.imshow(masked, aspect="auto", interpolation=interp, cmap=cmap, norm=norm)
    fig.colorbar(image, ax=ax, label="samples (log scale)" if spread else "samples")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    s = summarize_counts(counts)
    ax.set_title(
        f"{n_clients} clients x {n_classes} classes, {s['classes_mean']:.1f} classes/client (mean)"
    )
    if n_classes <= 30:
        ax.set_xticks(np.arange(n_classes))
        names = [str(c) for c in classes]
        crowded = n_classes > 10 or sum(map(len, names)) > 40  # CIFAR-10's names overlap
        ax.set_xticklabels(names, rotation=90 if crowded else 0)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
    if n_clients <= 40:
        ax.set_yticks(np.arange(n_clients))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=(path.suffix.lstrip(".") or "png"), dpi=120)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cmap() -> Colormap:
    """viridis with masked (zero) cells drawn white."""
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="white")
