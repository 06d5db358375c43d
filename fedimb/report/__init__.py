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


Modules: :mod:`~fedimb.report.runs` (read results folders), :mod:`~fedimb.report.summary`
(group and aggregate over seeds), :mod:`~fedimb.report.tables` (CSV and Markdown),
:mod:`~fedimb.report.plots` (PNG figures).
"""

from __future__ import annotations

from pathlib import Path

from fedimb.report.plots import (
    CURVES_PNG,
    LEGEND_MAX_CLASSES,
    LINE_STYLES,
    MARKERS,
    PER_CLASS_PNG,
    _per_class_matrix,  # noqa: F401
    curves_figure,
    per_class_figure,
    plot_curves,
    plot_per_class,
    plot_run_curves,
    run_curves_figure,
    series_styles,
)
from fedimb.report.runs import RunRecord, RunSet, load_runs
from fedimb.report.summary import (
    HEADLINE_KEYS,
    SPLIT_PREFIXES,
    GroupStats,
    _class_names,  # noqa: F401  (tests import it from here, as _per_class_matrix)
    _label_keys,
    split_keys_of,
    summarize,
)
from fedimb.report.tables import (
    FEW_CLASSES,
    REPORT_CSV,
    REPORT_MD,
    SHOT_TITLES,
    _write_csv,
    class_columns,
    markdown_table,
    reference_table,
)
from fedimb.results import atomic_write_text, check_target_error

__all__ = [
    "CURVES_PNG",
    "FEW_CLASSES",
    "HEADLINE_KEYS",
    "LEGEND_MAX_CLASSES",
    "LINE_STYLES",
    "MARKERS",
    "PER_CLASS_PNG",
    "REPORT_CSV",
    "REPORT_MD",
    "SHOT_TITLES",
    "SPLIT_PREFIXES",
    "GroupStats",
    "RunRecord",
    "RunSet",
    "build_report",
    "class_columns",
    "curves_figure",
    "load_runs",
    "markdown_table",
    "per_class_figure",
    "plot_curves",
    "plot_per_class",
    "plot_run_curves",
    "reference_table",
    "run_curves_figure",
    "series_styles",
    "split_keys_of",
    "summarize",
]


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
