"""The validated config object and the one place that builds it.

:func:`load_config` reads a TOML file (default ``configs/quickstart.toml``), applies
``--set`` overrides and calls :func:`from_nested`, which checks every key against the
schema, builds each component, then checks the rules across keys. The result is one
frozen :class:`Config` that every other module reads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedimb.config.checks import check_cross_field
from fedimb.config.components import (
    Component,
    build_component,
    check_component_params,
    tables_with_key,
)
from fedimb.config.parsing import (
    _refuse_sweep_file,
    apply_overrides,
    dump_toml,
    flatten,
    read_toml,
    unflatten,
)
from fedimb.config.schema import (
    COMPONENT_DEFAULTS,
    COMPONENT_OWN_KEYS,
    DEFAULT_CONFIG,
    FIXED_TABLES,
    TOP_LEVEL,
    ConfigError,
    _check_fields,
    _did_you_mean,
)
from fedimb.registry import is_import_path


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated experiment config. Build it with :func:`load_config` or ``from_*``."""

    values: Mapping[str, Any]
    """Top-level scalars and fixed tables, as flat dotted kebab keys (``long-tail.ratio``)."""
    components: Mapping[str, Component]
    """``partition``, ``loss``, ``sampling``, ``strategy``, ``model``."""
    strategy_options: Mapping[str, Any]
    """Run-level keys of the strategy table (``fraction-train``, ``min-train-clients``)."""
    overridden: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)
    """Flat keys given as overrides (``--set``, a sweep cell's) rather than by the file."""

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def loss(self) -> Component:
        return self.components["loss"]

    @property
    def strategy(self) -> Component:
        return self.components["strategy"]

    @property
    def partition(self) -> Component:
        return self.components["partition"]

    @property
    def model(self) -> Component:
        return self.components["model"]

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``strategies.make_strategy(self.strategy.name, ...)``:
        client sampling from ``fraction-train`` / ``min-train-clients``, plus the
        strategy's own parameters; FedNova's clients' momentum is the run's ``momentum``."""
        import strategies

        opts = self.strategy_options
        kwargs = {
            "fraction_train": opts["fraction-train"],
            "min_train_nodes": opts["min-train-clients"],
            "min_available_nodes": opts["min-train-clients"],
            **self.strategy.kwargs(),
        }
        if strategies.follows_client_momentum(self.strategy.name):
            kwargs["momentum"] = self["momentum"]
        return kwargs

    @property
    def sampling(self) -> Component:
        return self.components["sampling"]

    def raised_by(self, table: str, exc: BaseException) -> bool:
        """Whether ``exc``, raised while component ``table`` worked, is its own complaint,
        to report in one line: a ValueError or TypeError (a bad parameter), or any error
        of a plug-in (the user's own code); other errors of a built-in are bugs."""
        return isinstance(exc, ValueError | TypeError) or is_import_path(
            self.components[table].name
        )

    def component_error(self, table: str, exc: BaseException) -> ConfigError:
        """``exc``, raised by component ``table``, as one line naming it in config words
        (and the exception's type, unless a ValueError or TypeError)."""
        component = self.components[table]
        text = (
            str(exc) if isinstance(exc, ValueError | TypeError) else f"{type(exc).__name__}: {exc}"
        )
        return ConfigError(f"[{table}] {component.name}: {component.in_config_words(table, text)}")

    def to_nested(self) -> dict[str, Any]:
        """The config as nested tables (what a TOML file holds)."""
        nested: dict[str, Any] = {}
        for key, value in self.values.items():
            table, dot, sub = key.partition(".")
            if dot:
                nested.setdefault(table, {})[sub] = value
            else:
                nested[key] = value
        for table, comp in self.components.items():
            nested[table] = {"name": comp.name, **comp.params}
        nested["strategy"].update(self.strategy_options)
        return nested

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower's flat run config (dotted keys, scalar values)."""
        return flatten(self.to_nested())

    def to_toml(self) -> str:
        """The config as a TOML document that :func:`load_config` reads back."""
        return dump_toml(self.to_nested())

    def fingerprint(self, keys: Iterable[str]) -> str:
        """A stable string of the given flat keys' values (a cache key)."""
        flat = self.to_flat()
        return json.dumps({k: flat[k] for k in sorted(keys) if k in flat})

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new, re-validated config with dotted-key overrides applied."""
        return from_nested(apply_overrides(self.to_nested(), overrides))

    @staticmethod
    def from_flat(flat: Mapping[str, Any]) -> Config:
        """Build from Flower's flat run config (``context.run_config``)."""
        return from_nested(unflatten(flat))


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    plugins: Mapping[str, Iterable[str]] | None = None,
) -> Config:
    """Read a TOML config (default: ``configs/quickstart.toml``), apply overrides, validate.

    ``plugins``: table -> import paths of plug-ins whose parameters the table may carry
    for other runs (a sweep's other cells), as it may carry other registered components'.
    """
    nested = read_toml(path or DEFAULT_CONFIG)
    _refuse_sweep_file(path or DEFAULT_CONFIG, nested)
    config = from_nested(apply_overrides(nested, overrides or {}), plugins=plugins)
    return dataclasses.replace(config, overridden=frozenset(overrides or {}))


def from_nested(
    nested: Mapping[str, Any], *, plugins: Mapping[str, Iterable[str]] | None = None
) -> Config:
    """Validate a nested config (TOML tables) and build the :class:`Config` (``plugins``:
    as for :func:`load_config`)."""
    values: dict[str, Any] = {k: f.default for k, f in TOP_LEVEL.items()}
    for table, fields in FIXED_TABLES.items():
        values.update({f"{table}.{k}": f.default for k, f in fields.items()})
    tables = {**FIXED_TABLES, **{t: None for t in COMPONENT_DEFAULTS}}
    components: dict[str, Component] = {}
    strategy_options = {k: f.default for k, f in COMPONENT_OWN_KEYS["strategy"].items()}

    for key, value in nested.items():
        if isinstance(value, Mapping):
            if key not in tables:
                raise ConfigError(
                    f"unknown config table [{key}]{_did_you_mean(key, tables)}; "
                    f"valid tables: {', '.join(sorted(tables))}"
                )
        elif key in tables:
            raise ConfigError(f"{key} = {value!r}: {key!r} is a table, e.g. [{key}] name = ...")
        elif key not in TOP_LEVEL:
            in_tables = tables_with_key(key)
            hint = (
                f" (did you mean {' or '.join(map(repr, in_tables))}?)"
                if in_tables
                else _did_you_mean(key, list(TOP_LEVEL) + list(tables))
            )
            raise ConfigError(
                f"unknown config key {key!r}{hint}; "
                f"valid top-level keys: {', '.join(sorted(TOP_LEVEL))}"
            )
    values.update(_check_fields("", {k: v for k, v in nested.items() if k in TOP_LEVEL}, TOP_LEVEL))
    for table, fields in FIXED_TABLES.items():
        checked = _check_fields(f"{table}.", nested.get(table, {}), fields)
        values.update({f"{table}.{k}": v for k, v in checked.items()})
    for table in COMPONENT_DEFAULTS:
        body = dict(nested.get(table, {}))
        own_fields = COMPONENT_OWN_KEYS.get(table, {})
        own = {k: body.pop(k) for k in list(body) if k in own_fields}
        if table == "strategy":
            strategy_options.update(_check_fields("strategy.", own, own_fields))
        components[table] = build_component(table, body, (plugins or {}).get(table, ()))

    config = Config(
        values=MappingProxyType(values),
        components=MappingProxyType(components),
        strategy_options=MappingProxyType(strategy_options),
    )
    check_component_params(config)
    check_cross_field(config)
    return config
