"""Running a sweep's cells: claims, skips (resume), failures, ``sweep.json``, then the
report.

The single-run simulation is passed in as ``run_cell(overrides, cell_dir)``, so this
module never imports Flower, Ray or torch; an executor (:mod:`fedimb.sweep.executors`)
may run several cells at once through ``each``.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedimb.progress import SweepProgress
from fedimb.results import (
    SUMMARY_FILE,
    SWEEP_FILE,
    FolderBusy,
    atomic_write_json,
    atomic_write_text,
    claimed,
    finite_or_none,
    read_json,
)
from fedimb.sweep.spec import Cell, Selector, Sweep, default_out_dir, expand, matches

TRACEBACK_FILE = "traceback.txt"


_SWEEP_JSON_LOCK = threading.Lock()
RunCell = Callable[[dict[str, Any], Path], Any]
ValidateCell = Callable[[dict[str, Any], Path], Any]
IsDone = Callable[[dict[str, Any], Path], bool]
# each(one, cells): one(cell) for every cell, yielded as each finishes (map: in turn).
Each = Callable[[Callable[["Cell"], "CellResult"], list["Cell"]], Iterable["CellResult"]]


@dataclass(frozen=True)
class CellResult:
    """What happened to one cell in :func:`run_sweep`.

    ``status`` is the cell's ``summary.json`` status after the call ("completed",
    "failed", "running", or "missing" when the run wrote no summary); ``skipped`` is
    True when the cell was already completed and not run again.
    """

    name: str
    overrides: dict[str, Any]
    path: Path
    status: str
    skipped: bool = False
    final_balanced_error: float | None = None
    wall_time_s: float | None = None
    error: str | None = None


def _validate_all(cells: list[Cell], validate_cell: ValidateCell, out_dir: Path) -> None:
    """Run ``validate_cell`` on every cell; raise one ValueError listing every bad cell."""
    problems = []
    for cell in cells:
        try:
            validate_cell(dict(cell.overrides), out_dir / cell.name)
        except Exception as exc:
            problems.append(f"  cell {cell.name!r}: {type(exc).__name__}: {exc}")
    if problems:
        raise ValueError(
            f"{len(problems)} of {len(cells)} sweep cell(s) have an invalid config; "
            "nothing was run:\n" + "\n".join(problems)
        )


def _folder_status(cell_dir: Path) -> str:
    """A cell's status as its folder says (``pending`` without a summary)."""
    summary = read_json(cell_dir / SUMMARY_FILE) or {}
    return str(summary.get("status", "pending"))


def _write_sweep_json(
    out_dir: Path, sweep: Sweep, cells: list[Cell], in_hand: Mapping[str, str] | None = None
) -> None:
    """Rewrite sweep.json: the definition plus every cell's name, overrides and status.

    A cell's status is what its folder says, read now (other sweeps may be working in
    the folder), unless ``in_hand`` gives this process's word for it (running,
    interrupted).
    """
    in_hand = in_hand or {}
    with _SWEEP_JSON_LOCK:  # cells that run at once (each): one writer at a time
        atomic_write_json(
            out_dir / SWEEP_FILE,
            {
                "sweep": sweep.to_json(),
                "cells": [
                    {
                        "name": c.name,
                        "overrides": c.overrides,
                        "status": in_hand.get(c.name) or _folder_status(out_dir / c.name),
                        **({"method": c.method} if c.method is not None else {}),
                    }
                    for c in cells
                ],
            },
        )


def _record_failure(cell_dir: Path, cell: Cell, exc: BaseException, seconds: float) -> str:
    """Mark the cell failed in its summary.json (keeping what the run wrote) + traceback."""
    error = f"{type(exc).__name__}: {exc}"
    summary = read_json(cell_dir / SUMMARY_FILE) or {}
    summary.update(status="failed", error=error)
    summary.setdefault("wall_time_s", seconds)
    if "seed" in cell.overrides:
        summary.setdefault("seed", cell.overrides["seed"])
    atomic_write_json(cell_dir / SUMMARY_FILE, summary)
    atomic_write_text(
        cell_dir / TRACEBACK_FILE,
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )
    return error


def _result(cell: Cell, cell_dir: Path, skipped: bool, error: str | None = None) -> CellResult:
    summary = read_json(cell_dir / SUMMARY_FILE) or {}
    return CellResult(
        name=cell.name,
        overrides=dict(cell.overrides),
        path=cell_dir,
        status=str(summary.get("status", "missing")),
        skipped=skipped,
        final_balanced_error=finite_or_none(summary.get("final_balanced_error")),
        wall_time_s=finite_or_none(summary.get("wall_time_s")),
        error=error if error is not None else summary.get("error"),
    )


def _run_one(cell: Cell, cell_dir: Path, run_cell: RunCell) -> CellResult:
    """Run one cell; an exception becomes a recorded failure, not the end of the sweep."""
    # A stale traceback from an earlier failed attempt would contradict a success now.
    (cell_dir / TRACEBACK_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        run_cell(dict(cell.overrides), cell_dir)
    except Exception as exc:
        error = _record_failure(cell_dir, cell, exc, time.perf_counter() - start)
        return _result(cell, cell_dir, skipped=False, error=error)
    return _result(cell, cell_dir, skipped=False)


def _is_completed(overrides: dict[str, Any], cell_dir: Path) -> bool:
    summary = read_json(cell_dir / SUMMARY_FILE)
    return bool(summary) and summary.get("status") == "completed"


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path | None,
    run_cell: RunCell,
    *,
    validate_cell: ValidateCell | None = None,
    is_done: IsDone = _is_completed,
    progress: bool = True,
    stop_requested: Callable[[], bool] | None = None,
    only: Selector | None = None,
    each: Each = map,
) -> list[CellResult]:
    """Run every cell of ``sweep`` (skipping completed ones), then build the report.

    Parameters
    ----------
    sweep : Sweep
        From :func:`load_sweep`.
    out_dir : str, Path or None
        The sweep's folder (None: ``results/<sweep name>``). Cell ``c`` writes to
        ``out_dir/<c.name>``; ``sweep.json`` lists the cells and their status.
    run_cell : callable
        ``run_cell(overrides, cell_dir)`` runs one simulation with the base config plus
        ``overrides`` (dotted keys) and writes its results folder into ``cell_dir``.
        An exception marks the cell failed (``summary.json`` + ``traceback.txt``) and the
        sweep goes on; KeyboardInterrupt stops it (resumable).
    validate_cell : callable, optional
        ``validate_cell(overrides, cell_dir)`` raises on a bad config, or on one that
        differs from the config the cell's folder already holds (its results would mix
        the two). Called for every selected cell before anything runs or is written,
        so a typo fails in seconds, not hours in.
    is_done : callable
        ``is_done(overrides, cell_dir)``: True skips the cell. Default: its
        ``summary.json`` says completed (a caller that lets a cell's run go on for more
        rounds says when it has reached them).
    progress : bool
        True: a progress bar over cells (on a terminal). False: one plain line per cell.
    stop_requested : callable, optional
        Asked after each cell that ran: True stops the sweep there (KeyboardInterrupt),
        for a Ctrl-C that the cell's run finished despite.
    only : dict, optional
        A selector (:func:`parse_only`): run only the cells it matches. sweep.json and
        the report still list every cell.
    each : callable
        ``each(one, cells)`` yields ``one(cell)`` for every cell as it finishes; default
        ``map``, one after another. :mod:`fedimb.sweep.executors` runs several at once (cells
        then run on threads of this process, ``run_cell`` sending them elsewhere).

    Returns
    -------
    list of CellResult
        One per selected cell, in :func:`expand` order; a cell that another process
        was running is ``skipped`` with status "running elsewhere".

    Raises
    ------
    ValueError
        If ``validate_cell`` rejects any selected cell (the message names each bad cell).
    """
    cells = expand(sweep)
    chosen = [c for c in cells if matches(c.values, only or {})]
    out_dir = default_out_dir(sweep) if out_dir is None else Path(out_dir)
    # Shared: other sweeps may work here too (each cell is claimed alone); a run is kept out.
    with claimed(out_dir, shared=True):
        if validate_cell is not None:
            _validate_all(chosen, validate_cell, out_dir)
        return _run_cells(
            sweep, cells, chosen, out_dir, run_cell, is_done, progress, stop_requested, each
        )


def _run_cells(
    sweep: Sweep,
    cells: list[Cell],
    chosen: list[Cell],
    out_dir: Path,
    run_cell: RunCell,
    is_done: IsDone,
    progress: bool,
    stop_requested: Callable[[], bool] | None,
    each: Each,
) -> list[CellResult]:
    from fedimb.report import build_report  # report imports matplotlib; load it only here

    _write_sweep_json(out_dir, sweep, cells)

    def one(cell: Cell) -> CellResult:
        return _run_or_skip(sweep, cells, cell, out_dir, run_cell, is_done)

    results: list[CellResult] = []
    with SweepProgress(len(chosen), sweep.name, enabled=progress) as bar:
        for done, result in enumerate(each(one, chosen), start=1):
            ran = {} if result.skipped else {result.name: result.status}
            _write_sweep_json(out_dir, sweep, cells, ran)
            results.append(result)
            done_before = result.skipped and result.status == "completed"
            shown = "skipped (done)" if done_before else result.status
            bar.update(done, result.name, shown, result.final_balanced_error, result.wall_time_s)
            if not result.skipped and stop_requested is not None and stop_requested():
                raise KeyboardInterrupt
    order = {cell.name: i for i, cell in enumerate(cells)}
    results.sort(key=lambda r: order[r.name])  # as they finished: back to expand's order

    build_report(out_dir, target_error=sweep.target_error)
    return results


def _run_or_skip(
    sweep: Sweep,
    cells: list[Cell],
    cell: Cell,
    out_dir: Path,
    run_cell: RunCell,
    is_done: IsDone,
) -> CellResult:
    """Run ``cell`` unless it is done, or another process holds it."""
    cell_dir = out_dir / cell.name
    if is_done(dict(cell.overrides), cell_dir):
        return _result(cell, cell_dir, skipped=True)
    try:
        with claimed(cell_dir):  # nor a run of its own there, nor another sweep
            # Another sweep in this folder may have finished it since the check above.
            if is_done(dict(cell.overrides), cell_dir):
                return _result(cell, cell_dir, skipped=True)
            _write_sweep_json(out_dir, sweep, cells, {cell.name: "running"})
            try:
                return _run_one(cell, cell_dir, run_cell)
            except BaseException:
                # Ctrl-C (or a crash of the sweep itself): say so, then stop; a re-run
                # resumes from this cell.
                _write_sweep_json(out_dir, sweep, cells, {cell.name: "interrupted"})
                raise
    except FolderBusy:
        return replace(_result(cell, cell_dir, skipped=True), status="running elsewhere")
