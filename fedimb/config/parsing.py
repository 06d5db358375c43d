"""Reading and writing configs: TOML files, ``--set`` overrides and Flower's flat form.

Flower flattens TOML tables into dotted keys (``loss.name``); :func:`flatten` and
:func:`unflatten` convert between that and nested tables. Nothing here validates: the
result goes to :func:`fedimb.config.build.from_nested`.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedimb.config.schema import ConfigError


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"name": "ce"}}`` -> ``{"loss.name": "ce"}``."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"loss.name": "ce"}`` -> ``{"loss": {"name": "ce"}}`` (one level of tables)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        table, dot, sub = key.partition(".")
        if dot:
            nested.setdefault(table, {})[sub] = value
        else:
            nested[key] = value
    return nested


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML literal (``3``, ``0.5``, ``true``, ``"x"``), else text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["loss.name=focal", "lr=0.1"]`` -> ``{"loss.name": "focal", "lr": 0.1}``."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set loss.name=focal")
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def apply_overrides(nested: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``nested`` with dotted-key overrides set (tables created as needed)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in nested.items()}
    for key, value in overrides.items():
        table, dot, sub = key.partition(".")
        if dot:
            if table in out and not isinstance(out[table], dict):
                raise ConfigError(f"--set {key}: {table!r} is a value, not a table")
            out.setdefault(table, {})[sub] = value
        else:
            if isinstance(out.get(key), dict):
                raise ConfigError(f"--set {key}: {key!r} is a table; set {key}.name=... instead")
            out[key] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file raises :class:`ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a run config's .toml file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _refuse_sweep_file(path: str | Path, nested: Mapping[str, Any]) -> None:
    """A sweep file (``base`` and ``[grid]``) given where a run config belongs."""
    if "base" in nested and isinstance(nested.get("grid"), Mapping):
        raise ConfigError(
            f"{path} is a sweep file (base + [grid]), not a run config: run it with "
            f"`fedimb sweep {path}`, or give --config its base"
        )


def dump_toml(nested: Mapping[str, Any]) -> str:
    """Write scalars and one level of tables as TOML (enough for our configs)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        if isinstance(value, int | float):
            return repr(value)
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string

    def key(k: str) -> str:
        return k if k.replace("-", "").replace("_", "").isalnum() else json.dumps(k)

    lines = [f"{key(k)} = {literal(v)}" for k, v in nested.items() if not isinstance(v, Mapping)]
    for table, body in nested.items():
        if isinstance(body, Mapping):
            lines += ["", f"[{key(table)}]"] + [f"{key(k)} = {literal(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def parse_id_list(text: str) -> frozenset[int]:
    """``"0, 3"`` -> ``{0, 3}``; ``""`` -> empty."""
    return frozenset(int(t) for t in text.split(",") if t.strip())
