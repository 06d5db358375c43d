"""Sweep files and their cells: parsing, validation of the file's own tables, the
grid's expansion into named cells, and selectors (``--only``, ``[[exclude]]``).

The file format is described in :mod:`fedimb.sweep`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimb.config import DEFAULT_CONFIG, flatten, parse_value
from fedimb.results import (
    check_target_error,
)

SWEEP_KEYS = ("base", "name", "target-error", "set", "methods", "reference", "grid", "exclude")
DEFAULT_RESULTS_ROOT = Path("results")

# Longest cell folder name; most file systems allow 255 bytes, and the run writes
# files with their own names inside it.
_MAX_CELL_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")

# A selection of cells: grid key -> the values it may take (a cell matches every key).
Selector = dict[str, list[Any]]


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


def default_out_dir(sweep: Sweep, root: str | Path = DEFAULT_RESULTS_ROOT) -> Path:
    """``<root>/<sweep name>``, the folder a sweep writes to unless told otherwise."""
    return Path(root) / sweep.name
