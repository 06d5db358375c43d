"""What ``fedimb list`` and ``fedimb --version`` print. The bare listing reads the names
from :mod:`fedimb.catalog`, so it imports neither torch nor Flower; the listings of a
kind's parameters import that kind's registry.
"""

from __future__ import annotations

import json
from typing import Any

from fedimb.catalog import HOMES, registered_names
from fedimb.config import COMPONENT_OWN_KEYS


def names_listing() -> str:
    """Every registered component's name, one line per kind."""
    lines = [f"{kind}: {', '.join(registered_names(kind))}" for kind in HOMES]
    lines.append("each also takes your own as an import path 'package.module:attribute' (README)")
    return "\n".join(lines)


# `fedimb list TABLE`: the listing's word -> the config table.
LIST_TABLES = {
    "partitions": "partition",
    "losses": "loss",
    "samplers": "sampling",
    "models": "model",
    "strategies": "strategy",
}


def version_line() -> str:
    """``fedimb X (torch Y, flwr Z, Python W)``, from the installed packages' metadata
    (nothing imported)."""
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    others = ", ".join(f"{name} {version(name)}" for name in ("torch", "flwr"))
    return f"fedimb {version('fedimb')} ({others}, Python {platform.python_version()})"


def key_listing() -> str:
    """Every config key with its default and meaning; the component tables' parameters
    are in their own listings (``fedimb list losses``, ...)."""
    from fedimb.config import COMPONENT_DEFAULTS, COMPONENT_OWN_KEYS, FIXED_TABLES, TOP_LEVEL
    from fedimb.keys import MEANINGS, TABLE_MEANINGS

    def line(key: str, default: Any) -> str:
        return f"  {key.rpartition('.')[2]} = {json.dumps(default)}: {MEANINGS.get(key, '')}"

    lines = [
        "config keys = defaults: meaning (in a TOML file, or --set key=value / table.key=value)"
    ]
    lines += [line(key, field.default) for key, field in TOP_LEVEL.items()]
    for table, fields in FIXED_TABLES.items():
        lines.append(f"[{table}]")
        lines += [line(f"{table}.{key}", field.default) for key, field in fields.items()]
    words = {t: w for w, t in LIST_TABLES.items()}
    for table, default in COMPONENT_DEFAULTS.items():
        lines.append(f"[{table}]")
        lines.append(f"  name = {json.dumps(default)}: {TABLE_MEANINGS[table]}")
        for key, field in COMPONENT_OWN_KEYS.get(table, {}).items():
            lines.append(line(f"{table}.{key}", field.default))
        lines.append(f"  (each {table}'s parameters: fedimb list {words[table]})")
    return "\n".join(lines)


def dataset_listing() -> str:
    """Each registered dataset with the first line of its loader's docstring."""
    from fedimb.data import datasets

    lines = ["dataset = one of the following, or an import path 'package.module:loader':"]
    for name in datasets.list_datasets():
        doc = (datasets.DATASETS.get(name).__doc__ or "").strip().splitlines()
        text = doc[0].replace("``root", "``data-root").replace("``", "") if doc else ""
        lines.append(f"  {name}: {text}".rstrip())
    return "\n".join(lines)


def _list_notes(table: str) -> list[str]:
    """What a table's listing cannot show by itself."""
    from fedimb.losses import COSINE_SCALE

    if table == "loss":
        return [f"s unset: 1, or {COSINE_SCALE:g} on a cosine head (model.cosine-head)"]
    if table == "strategy":
        least = COMPONENT_OWN_KEYS["strategy"]["min-train-clients"].default
        return [
            f"also strategy.min-train-clients = {least}: sets min-train-nodes and "
            "min-available-nodes (either, set beside it, wins)",
            "fednova normalises by the clients' momentum: the run's momentum, not a setting",
        ]
    return []


def component_parameters(table: str) -> str:
    """Each registered component of ``table`` with its parameters, as config keys."""
    import strategies
    from fedimb.config import component_catalog, snake_to_kebab
    from strategies import REQUIRED

    def shown(value: Any) -> str:
        if value is REQUIRED:
            return "(required)"
        return "(unset)" if value is None else json.dumps(value)

    def listed(params: dict[str, Any]) -> str:
        text = ", ".join(f"{snake_to_kebab(k)} = {shown(v)}" for k, v in params.items())
        return text or "(no parameters)"

    names, defaults_of = component_catalog(table)
    params = {name: defaults_of(name) for name in names}
    if table == "strategy":  # FedNova's is the run's momentum, not a setting (a note says)
        for name in filter(strategies.follows_client_momentum, names):
            params[name].pop("momentum", None)
    shared = {
        k: v
        for k, v in params[names[0]].items()
        if all(p.get(k, REQUIRED) == v for p in params.values())
    }
    lines = [f"[{table}] name = one of the following, with its parameters (defaults):"]
    if len(names) < 2:
        shared = {}
    if shared:
        lines.append(f"  (all): {listed(shared)}")
    for name, own in params.items():
        rest = {k: v for k, v in own.items() if k not in shared}
        lines.append(f"  {name}: {listed(rest) if rest or not shared else '(all) only'}")
    lines.extend(f"  {note}" for note in _list_notes(table))
    return "\n".join(lines)
