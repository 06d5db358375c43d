"""The report's tables: ``report.csv`` and ``report.md`` (plus a published-reference
table when a sweep names one), one row per group of runs."""

from __future__ import annotations

import csv
import io
import itertools
import math
from pathlib import Path
from typing import Any

from fedimb.metrics import SHOT_GROUPS
from fedimb.report.runs import _display
from fedimb.report.summary import GroupStats, _class_names, split_keys_of
from fedimb.results import (
    atomic_write_text,
)

REPORT_CSV = "report.csv"
REPORT_MD = "report.md"

# Column titles of the shot groups in report.md.
SHOT_TITLES = {
    "many_shot_error": "many-shot",
    "medium_shot_error": "medium-shot",
    "few_shot_error": "few-shot",
}


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
