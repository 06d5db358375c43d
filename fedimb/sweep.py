"""Sweeps: a grid of config overrides, one run per cell, then a report.

A sweep file is a small TOML file::

    base = "quickstart.toml"          # a run config, relative to this file
    name = "compare-losses"           # output folder results/<name> by default
    target-error = 0.3                # optional: report "rounds to reach target"
    [set]                             # optional: fixed overrides for every cell
    engine = "inprocess"
    [methods]                         # optional: named sets of keys, one axis
    ERM = { "loss.name" = "ce" }
    RS = { "loss.name" = "ce", "sampling.name" = "class-balanced" }
    [grid]                            # cartesian product over dotted config keys
    "loss.name" = ["ce", "focal"]
    seed = [0, 1, 2]
    [[exclude]]                       # optional: drop the cells that match every key
    "loss.name" = "focal"             # (a list matches any of its values)
    seed = [1, 2]

A method is what a paper's table row names (a loss with a sampler, a loss with its
head): several keys that vary together. Methods form the first axis; the report groups
by method (its label) and the grid keys. A calibration adds the published errors, which
the report shows beside its own (``balanced`` and any class name, as fractions)::

    [reference]
    source = "Cao et al. 2019, Table 1"
    ERM = { balanced = 0.3682, neg = 0.7078, pos = 0.0286 }

The single-run simulation is passed in as a callable ``run_cell(overrides, cell_dir)``,
so this module never imports Flower, Ray or torch. Each cell writes its own results
folder ``<out_dir>/<cell name>/``; a completed cell is skipped on the next call, so an
interrupted sweep resumes where it stopped (the caller may say a completed cell needs
more rounds: ``is_done``). A completed cell's folder needs no checkpoint to count: a
ledger of committed results skips it on any machine. ``only`` runs some cells (the rest
stay listed, so the report shows what is still missing), and several sweeps may work in
one folder at once: each cell is claimed by the process that runs it, and a cell claimed
elsewhere is left to that process.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedimb.config import DEFAULT_CONFIG, flatten, parse_value
from fedimb.progress import SweepProgress
from fedimb.results import (
    SUMMARY_FILE,
    SWEEP_FILE,
    FolderBusy,
    atomic_write_json,
    atomic_write_text,
    check_target_error,
    claimed,
    finite_or_none,
    read_json,
)

TRACEBACK_FILE = "traceback.txt"
SWEEP_KEYS = ("base", "name", "target-error", "set", "methods", "reference", "grid", "exclude")
DEFAULT_RESULTS_ROOT = Path("results")

# Longest cell folder name; most file systems allow 255 bytes, and the run writes
# files with their own names inside it.
_MAX_CELL_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")

# A selection of cells: grid key -> the values it may take (a cell matches every key).
Selector = dict[str, list[Any]]
_SWEEP_JSON_LOCK = threading.Lock()
RunCell = Callable[[dict[str, Any], Path], Any]
ValidateCell = Callable[[dict[str, Any], Path], Any]
IsDone = Callable[[dict[str, Any], Path], bool]
# each(one, cells): one(cell) for every cell, yielded as each finishes (map: in turn).
Each = Callable[[Callable[["Cell"], "CellResult"], list["Cell"]], Iterable["CellResult"]]


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file.

    Attributes
    ----------
    base : Path
        The run config every cell starts from (absolute path).
    name : str
        The sweep's name (default output folder ``results/<name>``).
    target_error : float or None
        Balanced error for the report's "rounds to reach target" column.
    fixed : dict
        Dotted config key -> value applied to every cell (the ``[set]`` table).
    grid : dict
        Dotted config key -> non-empty list of values; cells are their product.
    methods : dict
        Label -> dotted config key -> value (the ``[methods]`` table); an axis before
        the grid's (empty: none).
    exclude : list of dict
        Selectors (grid key -> values) of the product's cells that are not cells (the
        ``[[exclude]]`` tables).
    """

    base: Path
    name: str
    target_error: float | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    """Published errors per method label, plus their ``source`` (``[reference]``)."""
    exclude: list[Selector] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The definition as JSON-ready data (for ``sweep.json``)."""
        base = self.base
        with contextlib.suppress(ValueError):  # a committed ledger names no home folder
            base = base.relative_to(Path.cwd().resolve())
        return {
            "base": str(base),
            "name": self.name,
            "target_error": self.target_error,
            "set": dict(self.fixed),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "methods": {k: dict(v) for k, v in self.methods.items()},
            "reference": dict(self.reference),
            "exclude": [dict(e) for e in self.exclude],
        }


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a folder-safe ``name``, the config ``overrides`` and the
    label of its ``method`` (None without ``[methods]``)."""

    name: str
    overrides: dict[str, Any]
    method: str | None = None

    @property
    def values(self) -> dict[str, Any]:
        """What a selector (``--only``, ``[[exclude]]``) matches: the overrides and the
        method's label under ``method``."""
        return self.overrides if self.method is None else {**self.overrides, "method": self.method}


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


# --------------------------------------------------------------------------- loading


def _check_value(where: str, value: Any) -> None:
    """Allow only JSON-representable TOML values (no dates), so sweep.json can hold them."""
    if isinstance(value, list):
        for item in value:
            _check_value(where, item)
    elif not isinstance(value, str | int | float | bool):
        raise ValueError(
            f"{where}: unsupported value {value!r} of type {type(value).__name__}; "
            "allowed: strings, numbers, booleans and lists of them"
        )


def _parse_grid(raw: Any) -> dict[str, list[Any]]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"grid must be a table of 'key = [values]', got {raw!r}")
    grid = flatten(raw)
    if not grid:
        raise ValueError("grid is empty: give at least one 'key = [value, ...]' under [grid]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"grid key {key!r} must map to a non-empty list of values, got {values!r}"
            )
        _check_value(f"grid key {key!r}", values)
        as_json = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(as_json)) != len(as_json):
            raise ValueError(f"grid key {key!r} lists the same value twice: {values!r}")
    return grid


def _parse_methods(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise ValueError(
            f"methods must be a table of 'Label = {{ \"key\" = value, ... }}', got {raw!r}"
        )
    methods = {}
    for label, body in raw.items():
        if not label or _UNSAFE.sub("_", label) != label:
            raise ValueError(
                f"method label {label!r} must be folder-safe (letters, digits, '._=,+-')"
            )
        keys = flatten(body)
        if not keys:
            raise ValueError(f"method {label!r} sets no key")
        for key, value in keys.items():
            _check_value(f"method {label!r} key {key!r}", value)
        methods[label] = keys
    return methods


def _parse_reference(raw: Any, methods: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"reference must be a table, got {raw!r}")
    reference: dict[str, Any] = {}
    for label, body in raw.items():
        if label == "source":
            if not isinstance(body, str):
                raise ValueError(f"reference source must be a string, got {body!r}")
            reference[label] = body
            continue
        if label not in methods:
            raise ValueError(
                f"reference {label!r} is not a method; methods: {', '.join(methods) or 'none'}"
            )
        if not isinstance(body, Mapping) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
            for v in body.values()
        ):
            raise ValueError(
                f"reference {label!r} must be a table of errors in [0, 1], e.g. "
                f"{{ balanced = 0.3682, neg = 0.7078 }}, got {body!r}"
            )
        reference[label] = {k: float(v) for k, v in body.items()}
    return reference


def _same(a: Any, b: Any) -> bool:
    """Equal as TOML wrote them (2 and 2.0, 1 and true differ, as in a cell's name)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_selector(
    raw: Mapping[str, Any], grid: Mapping[str, list[Any]], where: str, *, in_grid: bool = True
) -> Selector:
    """A selector of cells: each key swept in ``grid``, each value one of its values
    (unless not ``in_grid``: an exclusion may name values for a grid yet to be edited).

    A scalar value becomes a one-value list. Raises ValueError naming the key or value
    that selects nothing and what is allowed, so a typo never silently drops cells.
    """
    selector: Selector = {}
    for key, value in raw.items():
        if key not in grid:
            raise ValueError(f"{where}: {key!r} is not a grid key; grid keys: {list(grid)}")
        values = value if isinstance(value, list) else [value]
        _check_value(f"{where}: {key}", values)
        for v in values if in_grid else []:
            if not any(_same(v, g) for g in grid[key]):
                raise ValueError(f"{where}: {key}={v!r} is not in the grid; allowed: {grid[key]}")
        selector[key] = values
    return selector


def _axes(grid: Mapping[str, list[Any]], methods: Mapping[str, Any]) -> dict[str, list[Any]]:
    """What selectors may name: the grid's keys, and ``method`` (its labels) if any."""
    return {"method": list(methods), **grid} if methods else dict(grid)


def matches(values: Mapping[str, Any], selector: Mapping[str, list[Any]]) -> bool:
    """Whether a cell's ``values`` take one of the selector's values for every key."""
    return all(any(_same(values.get(k), v) for v in vs) for k, vs in selector.items())


def _parse_exclude(raw: Any, grid: Mapping[str, list[Any]]) -> list[Selector]:
    if not isinstance(raw, list) or not all(isinstance(e, Mapping) and e for e in raw):
        raise ValueError(
            f"exclude must be [[exclude]] tables of 'grid key = value or [values]', got {raw!r}"
        )
    return [
        check_selector(flatten(e), grid, f"exclude #{i}", in_grid=False)
        for i, e in enumerate(raw, 1)
    ]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file.

    Parameters
    ----------
    path : str or Path
        The sweep TOML file; its ``base`` is resolved relative to its folder, else
        among fedimb's own ``configs/`` (``base = "quickstart.toml"`` from anywhere).

    Returns
    -------
    Sweep

    Raises
    ------
    ValueError
        Unknown top-level key, missing or non-existent ``base``, empty ``grid``, a grid
        value that is not a non-empty list, a key both fixed and swept, a bad
        ``target-error``, an ``exclude`` key or value not in the grid, or one that
        leaves no cell.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"sweep file {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"sweep file {str(path)!r} is not valid TOML: {exc}") from exc

    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in sweep file {str(path)!r}; valid keys: {list(SWEEP_KEYS)}"
        )
    base_raw = raw.get("base")
    if not isinstance(base_raw, str) or not base_raw:
        raise ValueError(
            f"sweep file {str(path)!r} needs 'base = \"<run config>.toml\"', got {base_raw!r}"
        )
    base = (path.parent / base_raw).resolve()
    shipped = DEFAULT_CONFIG.parent / base_raw
    if not base.is_file() and shipped.is_file():
        base = shipped  # one of fedimb's configs by name, from a sweep file anywhere
    if not base.is_file():
        raise ValueError(
            f"base config {base_raw!r} not found (looked at {str(base)!r} and among "
            f"fedimb's configs in {str(shipped.parent)!r})"
        )

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or _UNSAFE.sub("_", name) != name:
        raise ValueError(
            f"name must be a non-empty folder-safe string (letters, digits, '._=,+-'), got {name!r}"
        )

    fixed_raw = raw.get("set", {})
    if not isinstance(fixed_raw, Mapping):
        raise ValueError(f"set must be a table of 'key = value', got {fixed_raw!r}")
    fixed = flatten(fixed_raw)
    for key, value in fixed.items():
        _check_value(f"set key {key!r}", value)

    if "grid" not in raw:
        raise ValueError(f"sweep file {str(path)!r} has no [grid] table")
    grid = _parse_grid(raw["grid"])
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ValueError(f"key(s) {both} are both fixed in [set] and swept in [grid]")
    methods = _parse_methods(raw.get("methods", {}))
    in_methods = {k for keys in methods.values() for k in keys}
    clash = sorted(in_methods & (set(fixed) | set(grid)))
    if clash:
        raise ValueError(
            f"key(s) {clash} are set by [methods] and also in [set] or [grid]; give each "
            "key one place"
        )

    sweep = Sweep(
        base=base,
        name=name,
        target_error=check_target_error(raw.get("target-error")),
        fixed=fixed,
        grid=grid,
        methods=methods,
        reference=_parse_reference(raw.get("reference", {}), methods),
        exclude=_parse_exclude(raw.get("exclude", []), _axes(grid, methods)),
    )
    if not expand(sweep):
        raise ValueError(f"sweep file {str(path)!r}: [[exclude]] leaves no cell of the grid")
    return sweep


# --------------------------------------------------------------------------- cells


def _value_slug(value: Any) -> str:
    """Short text for a grid value in a folder name."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _short_hash(overrides: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def _cell_name(values: Mapping[str, Any]) -> str:
    """``key=value,key=value`` with unsafe characters replaced; long names get a hash."""
    text = ",".join(f"{k}={_value_slug(v)}" for k, v in values.items())
    slug = _UNSAFE.sub("_", text).strip(".") or "cell"
    if len(slug) > _MAX_CELL_NAME:
        slug = f"{slug[: _MAX_CELL_NAME - 9]}-{_short_hash(values)}"
    return slug


def expand(sweep: Sweep) -> list[Cell]:
    """All cells of the grid, in a fixed order.

    The order is the grid's key order (as written in the file) with the last key varying
    fastest, so ``seed`` listed last keeps replicate runs next to each other.

    Returns
    -------
    list of Cell
        ``overrides`` = the fixed ``[set]`` values plus the cell's grid values; ``name``
        is built from the grid values only and is unique within the sweep. Combinations
        that match an ``exclude`` selector are left out.
    """
    keys = list(sweep.grid)
    methods = sweep.methods or {None: {}}
    cells: list[Cell] = []
    for (label, method), combo in itertools.product(
        methods.items(), itertools.product(*(sweep.grid[k] for k in keys))
    ):
        values = dict(zip(keys, combo, strict=True))
        named = values if label is None else {"method": label, **values}
        if any(matches(named, e) for e in sweep.exclude):
            continue
        overrides = {**sweep.fixed, **method, **values}
        cells.append(Cell(name=_cell_name(named), overrides=overrides, method=label))
    # Slugging can map different values to one name ("a/b" vs "a_b"): disambiguate.
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.name] = counts.get(cell.name, 0) + 1
    return [
        Cell(f"{c.name}-{_short_hash(c.overrides)}", c.overrides, c.method)
        if counts[c.name] > 1
        else c
        for c in cells
    ]


def parse_only(items: list[str], sweep: Sweep) -> Selector:
    """``["loss.name=ce", "loss.name=focal", "seed=0"]`` -> a selector: a cell runs if it
    takes one of the values given for each key (``--only``, repeatable).

    Raises
    ------
    ValueError
        An item that is not KEY=VALUE, a key not swept, a value not in the grid, or a
        selection of no cell.
    """
    raw: dict[str, list[Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--only {item!r}: expected KEY=VALUE, e.g. --only loss.name=ce")
        raw.setdefault(key.strip(), []).append(parse_value(value.strip()))
    selector = check_selector(raw, _axes(sweep.grid, sweep.methods), "--only")
    if selector and not any(matches(c.values, selector) for c in expand(sweep)):
        raise ValueError(f"--only {' '.join(items)}: selects no cell of the sweep")
    return selector


# --------------------------------------------------------------------------- running


def default_out_dir(sweep: Sweep, root: str | Path = DEFAULT_RESULTS_ROOT) -> Path:
    """``<root>/<sweep name>``, the folder a sweep writes to unless told otherwise."""
    return Path(root) / sweep.name


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
        ``map``, one after another. :mod:`fedimb.executors` runs several at once (cells
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
