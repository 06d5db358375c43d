"""The experiment config: TOML (+ ``--set`` overrides) -> one frozen, validated object.

A config is a TOML file with kebab-case keys, usable as it is as a Flower run config
(``flwr run . --run-config configs/x.toml``): Flower flattens tables into dotted keys
(``loss.name``), and :meth:`Config.from_flat` reads exactly that form back.

The config is validated here, once, before any data is loaded or Ray starts: unknown
keys (with a did-you-mean), wrong types, out-of-range values and unknown component
names each give one :class:`ConfigError` naming the key, the value and what is allowed.
The loss and strategy are built here to check their parameters; what needs the data
(the partition, the model on the data's shape, the sampler's schedule, a plug-in loss
on real counts) is checked by :func:`fedimb.preflight.prepare`, still before any engine starts.

The component tables (``[loss]``, ``[strategy]``, ``[partition]``, ``[model]``,
``[sampling]``) hold a ``name`` plus parameters. A table may carry parameters of several
components (so a sweep over ``loss.name`` can share one ``[loss]`` table): each component
receives the parameters it accepts; a key that no registered component accepts is an
error. A ``name`` that is an import path (``"pkg.mod:obj"``) takes its keyword parameters
the same way, checked against their defaults' types (one with ``**kwargs`` receives every
key of its table and checks them itself).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import pickle
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fedimb.engines import engine_names
from fedimb.registry import (
    REQUIRED,
    RegistryError,
    callable_params,
    import_object,
    is_import_path,
)
from fedimb.schedule import scheduled_lr, switch_round

# fedimb's shipped configs: inside the package in an installed wheel (setup.py maps
# configs/ to fedimb/configs), else beside it, in a checkout or an editable install.
_PACKAGE = Path(__file__).resolve().parent
CONFIGS_DIR = next(
    (d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if d.is_dir()),
    _PACKAGE.parent / "configs",
)
DEFAULT_CONFIG = CONFIGS_DIR / "quickstart.toml"

ENGINES = engine_names()
ON_OFF_AUTO = ("auto", "on", "off")
PRECISIONS = ("fp32", "bf16")
OPTIMIZER_STATES = ("reset", "keep")


class ConfigError(ValueError):
    """A config that cannot run: the message names the key, the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One scalar config key: its type, default and the rule its value must meet."""

    type: type
    default: Any
    check: Callable[[Any], bool] = lambda v: True
    allowed: str = ""
    listed: bool = False  # a comma-separated string; a number or an array of them is joined


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _fraction(v: float) -> bool:
    return 0 < v <= 1


def _choice(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _device_ok(v: str) -> bool:
    return v in ("auto", "cpu", "cuda") or v.startswith("cuda:")


TOP_LEVEL: dict[str, Field] = {
    "dataset": Field(str, "digits"),  # a registered name or an import path
    "data-root": Field(str, ""),  # the dataset's folder ('' = its default)
    "num-clients": Field(int, 20, _positive, "an integer >= 1"),
    "num-rounds": Field(int, 10, _positive, "an integer >= 1"),
    "local-epochs": Field(int, 1, _positive, "an integer >= 1"),
    "batch-size": Field(int, 32, _positive, "an integer >= 1"),
    "lr": Field(float, 0.05, _positive, "a number > 0"),
    "momentum": Field(float, 0.0, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight-decay": Field(float, 0.0, _non_negative, "a number >= 0"),
    # SGD's momentum buffers: start each round from zero, or carry each client's over
    # (a stateful client, checkpointed like SCAFFOLD's c_i)
    "optimizer-state": Field(str, "reset", *_choice(*OPTIMIZER_STATES)),
    "seed": Field(int, 0, _non_negative, "an integer >= 0"),
    # The long tail's subset and the partition; -1 = seed. Fixing it while seeds vary
    # repeats training over one split (a seed's spread is then training's alone).
    "data-seed": Field(int, -1, lambda v: v >= -1, "an integer >= 0, or -1 (= seed)"),
    "engine": Field(str, "ray", *_choice(*ENGINES)),
    "device": Field(str, "auto", _device_ok, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "augment": Field(str, "auto", *_choice(*ON_OFF_AUTO)),
    "batched": Field(str, "auto", *_choice(*ON_OFF_AUTO)),
    "group-size": Field(int, 0, _non_negative, "an integer >= 0 (0 = a whole round at once)"),
    "threads": Field(
        int, 0, _non_negative, "an integer >= 0 (0 = auto: 1 on CPU without convolutions)"
    ),
    "precision": Field(str, "fp32", *_choice(*PRECISIONS)),
    "channels-last": Field(bool, False),
    "cudnn-benchmark": Field(bool, False),
    "eval-every": Field(int, 1, _positive, "an integer >= 1"),
    "eval-batch-size": Field(int, 1024, _positive, "an integer >= 1"),
    "checkpoint-every": Field(int, 1, _non_negative, "an integer >= 0 (0 = never)"),
    # Per-round loggers, comma-separated: 'tensorboard' or 'package.module:factory'.
    "loggers": Field(str, ""),
    "max-failure-fraction": Field(float, 0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "client-timeout": Field(float, 0.0, _non_negative, "seconds >= 0 (0 = no limit)"),
    "round-timeout": Field(float, 3600.0, _positive, "seconds > 0"),
    "out-dir": Field(str, ""),  # the results folder ('' = a new one under results/)
}

_IDS = 'comma-separated integers, e.g. "0,3" or [0, 3]'
# Tables whose keys are fixed.
FIXED_TABLES: dict[str, dict[str, Field]] = {
    "long-tail": {
        "ratio": Field(float, 1.0, lambda v: v >= 1, "a number >= 1 (1 = no long tail)"),
        "profile": Field(str, "exp", *_choice("exp", "step")),
        # Per-class keep fractions instead of a ratio (imbalanced IMDB keeps "0.1,1.0").
        "keep": Field(
            str, "", allowed='a fraction in (0, 1] per class, e.g. "0.1,1.0"', listed=True
        ),
        # Shot groups of the metrics, by global training samples per class: many-shot
        # above the first, few-shot below the second (Liu et al. 2019: 100, 20).
        "many-shot-above": Field(int, 100, _non_negative, "an integer >= 0"),
        "few-shot-below": Field(int, 20, _non_negative, "an integer >= 0"),
    },
    # Token datasets (imdb): the vocabulary's size (padding and unknown included) and
    # the tokens kept per document.
    "text": {
        "vocab-size": Field(int, 20000, lambda v: v >= 3, "an integer >= 3"),
        "max-len": Field(int, 400, _positive, "an integer >= 1"),
    },
    "ray": {
        "address": Field(str, ""),  # an existing Ray cluster ('' = start a local one)
        "client-cpus": Field(float, 1.0, _positive, "a number > 0"),
        "client-gpus": Field(float, 0.0, _non_negative, "a number >= 0"),
    },
    # The clients' learning rate by round (see lr_in_round).
    "lr-schedule": {
        "decay": Field(float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = none)"),
        # rounds (or fractions of num-rounds) where lr is multiplied by gamma
        "milestones": Field(
            str, "", allowed='rounds or fractions, e.g. "0.8,0.9" or [150, 180]', listed=True
        ),
        "gamma": Field(float, 0.1, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        # the first rounds ramp up linearly: round r <= warmup-rounds trains at lr * r / it
        "warmup-rounds": Field(
            int, 0, _non_negative, "an integer >= 0 (0 = none), at most num-rounds"
        ),
    },
    # A seeded subsample of the training data after the long tail (a quick look on a CPU).
    "subsample": {
        "fraction": Field(float, 1.0, _fraction, "a number in (0, 1] (1 = all)"),
        "per-class-cap": Field(int, 0, _non_negative, "an integer >= 0 (0 = no cap)"),
    },
    # Test-only fault injection: comma-separated partition ids, "" = none.
    "faults": {
        "raise-clients": Field(str, "", allowed=_IDS, listed=True),
        "nan-clients": Field(str, "", allowed=_IDS, listed=True),
        "slow-clients": Field(str, "", allowed=_IDS, listed=True),
        "slow-s": Field(float, 0.0, _non_negative, "seconds >= 0"),
        "rounds": Field(str, "", allowed=_IDS, listed=True),  # where faults fire ('' = all)
    },
}

# Component tables: a name plus parameters checked against the named component.
COMPONENT_DEFAULTS: dict[str, str] = {
    "partition": "label-skew",
    "loss": "ce",
    "sampling": "instance",
    "strategy": "fedavg",
    "model": "mlp",
}
# Keys of component tables that the run itself uses (not passed to the component).
COMPONENT_OWN_KEYS: dict[str, dict[str, Field]] = {
    "strategy": {
        "fraction-train": Field(float, 1.0, _fraction, "a number in (0, 1]"),
        "min-train-clients": Field(int, 2, _positive, "an integer >= 1"),
    },
}


# Ranges of component parameters that the components do not check themselves (Flower's
# strategies take any number); (table, parameter) -> (rule, what is allowed).
_UNIT = (lambda v: 0 <= v < 1, "a number in [0, 1)")
PARAM_RANGES: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("model", "hidden"): (_positive, "an integer >= 1"),
    ("model", "width"): (_positive, "an integer >= 1"),
    ("strategy", "fraction-evaluate"): (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("strategy", "proximal-mu"): (_non_negative, "a number >= 0"),
    ("strategy", "server-learning-rate"): (_positive, "a number > 0"),
    ("strategy", "server-momentum"): _UNIT,
    ("strategy", "momentum"): _UNIT,
    ("strategy", "eta"): (_positive, "a number > 0"),
    ("strategy", "eta-l"): (_positive, "a number > 0"),
    ("strategy", "tau"): (_positive, "a number > 0"),
    ("strategy", "beta-1"): _UNIT,
    ("strategy", "beta-2"): _UNIT,
    ("strategy", "beta"): (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    ("strategy", "q"): (_non_negative, "a number >= 0"),
    ("strategy", "spreadout-lr"): (_positive, "a number > 0"),
    ("strategy", "spreadout-steps"): (_non_negative, "an integer >= 0"),
    ("strategy", "num-malicious-nodes"): (_non_negative, "an integer >= 0"),
    ("strategy", "min-train-nodes"): (_positive, "an integer >= 1"),
    ("strategy", "min-evaluate-nodes"): (_non_negative, "an integer >= 0"),
    ("strategy", "min-available-nodes"): (_positive, "an integer >= 1"),
}


# Run-level keys that components' errors name as their arguments.
RUN_WORDS = ("num_rounds", "num_clients")


def kebab_to_snake(key: str) -> str:
    """``max-m`` -> ``max_m``."""
    return key.replace("-", "_")


def snake_to_kebab(key: str) -> str:
    """``max_m`` -> ``max-m``."""
    return key.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Component:
    """A named, parameterised piece of the run (a loss, a strategy, ...).

    ``params`` holds only the parameters this component accepts, with kebab-case keys;
    ``ignored``, the keys of its table that only other components take.
    """

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ignored: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)

    def kwargs(self) -> dict[str, Any]:
        """The parameters as snake_case keyword arguments for the component's factory."""
        return {kebab_to_snake(k): v for k, v in self.params.items()}

    def in_config_words(self, table: str, text: str) -> str:
        """``text`` with this component's parameter names (and the run-level ``RUN_WORDS``)
        spelt as config keys: ``drs-start``, not ``drs_start``."""
        try:
            names = set(component_catalog(table)[1](self.name))
        except Exception:  # a plug-in that cannot be inspected: the given names only
            names = set()
        return in_config_words(text, names | set(self.kwargs()))


def in_config_words(text: str, names: Iterable[str] = ()) -> str:
    """``text`` with ``names`` and the run-level ``RUN_WORDS`` spelt as config keys."""
    for snake in sorted({*names, *RUN_WORDS}, key=len, reverse=True):  # longest first
        text = re.sub(rf"\b{re.escape(snake)}\b", snake_to_kebab(snake), text)
    return text


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


# --------------------------------------------------------------------------- parsing


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


# ------------------------------------------------------------------------ validation


def _tables_with_key(key: str) -> list[str]:
    """``table.key`` for each table where ``key`` is a field or a component's parameter."""
    found = [f"{t}.{key}" for t, fields in FIXED_TABLES.items() if key in fields]
    for table in COMPONENT_DEFAULTS:
        if key in registered_keys(table) or key in COMPONENT_OWN_KEYS.get(table, {}):
            found.append(f"{table}.{key}")
    return found


@functools.cache  # the registries are filled at import; every config load asks
def registered_keys(table: str) -> frozenset[str]:
    """The config keys (kebab-case) that some registered component of ``table`` takes."""
    names, defaults_of = component_catalog(table)
    return frozenset(snake_to_kebab(k) for n in names for k in defaults_of(n))


def _did_you_mean(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(key: str, value: Any, field: Field) -> Any:
    """Check the type of ``value`` (an int is accepted where a float is expected)."""
    if field.listed and _numbers(value):  # `--set faults.rounds=3`, `milestones = [0.8, 0.9]`
        value = ",".join(str(v) for v in (value if isinstance(value, list) else [value]))
    if field.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if field.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, field.type) or (field.type is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{key} = {value!r}: expected "
            + (field.allowed or _TYPE_WORDS.get(field.type, field.type.__name__))
        )
    if not field.check(value):
        raise ConfigError(f"{key} = {value!r}: must be {field.allowed}")
    return value


def _numbers(value: Any) -> bool:
    """A number, or a non-empty list of numbers (bools excluded)."""
    items = value if isinstance(value, list) and value else [value]
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in items)


def _check_fields(
    prefix: str, given: Mapping[str, Any], fields: Mapping[str, Field]
) -> dict[str, Any]:
    out = {}
    for key, value in given.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {prefix + key!r}{_did_you_mean(key, fields)}; "
                f"valid keys here: {', '.join(sorted(fields))}"
            )
        out[key] = _coerce(prefix + key, value, fields[key])
    return out


def component_catalog(table: str) -> tuple[list[str], Callable[[str], dict[str, Any]]]:
    """Registered names and a ``name -> {param: default}`` function for a component table.

    Imported lazily so that reading a config does not import torch until it is validated.
    """
    if table == "loss":
        from fedimb import losses

        return losses.list_losses(), losses.loss_defaults
    if table == "sampling":
        from fedimb import sampling

        return sampling.list_samplers(), sampling.sampler_params
    if table == "partition":
        from fedimb.data.partition import PARTITIONERS, partition_params

        return PARTITIONERS.names(), partition_params
    if table == "model":
        from fedimb import models

        return models.list_models(), models.model_params
    if table == "strategy":
        import strategies

        return strategies.list_strategies(), strategies.strategy_params
    raise KeyError(table)


# What fedimb itself passes to a plug-in of each table, not config keys: how many leading
# positional arguments (the counts, the data shape, the labels ...) and which keywords.
_SUPPLIED: dict[str, tuple[int, frozenset[str]]] = {
    "loss": (1, frozenset({"server_round", "num_rounds"})),
    "sampling": (2, frozenset({"server_round", "num_rounds"})),
    "model": (2, frozenset({"vocab_size"})),
    "partition": (3, frozenset()),
}


@functools.cache  # a plug-in's signature does not change within a process
def plugin_params(table: str, name: str) -> tuple[dict[str, Any], bool]:
    """A plug-in's config parameters (kebab-case) with their defaults (``REQUIRED``: none),
    and whether it takes ``**kwargs`` (then it receives every key of its table and checks
    them itself). A strategy's follow ``**kwargs`` up to the Flower class it extends."""
    if table == "strategy":
        import strategies

        params, open_ended = strategies.strategy_signature(name)
        return {snake_to_kebab(k): v for k, v in params.items()}, open_ended
    obj = import_object(name)
    skip, supplied = _SUPPLIED[table]
    try:
        params, var_kw = callable_params(obj, skip)
    except (TypeError, ValueError):  # not introspectable: it checks its own
        return {}, True
    return {snake_to_kebab(k): v for k, v in params.items() if k not in supplied}, var_kw


@functools.cache  # called per client and round (fedimb.federation.loss_kwargs)
def declares(table: str, name: str, key: str) -> bool:
    """Whether component ``name`` of ``table`` takes parameter ``key`` (kebab-case): every
    built-in model takes ``cosine-head`` and every built-in loss ``s``; a plug-in, if its
    signature names it or has ``**kwargs``."""
    if not is_import_path(name):
        return key in {snake_to_kebab(k) for k in component_catalog(table)[1](name)}
    try:
        params, var_kw = plugin_params(table, name)
    except RegistryError:
        return False
    return var_kw or key in params


def _declared(table: str, name: str) -> set[str] | None:
    """A plug-in's declared parameters; None (any key) for ``**kwargs``, or for a path that
    does not import (its own cell says so: the others need not guess)."""
    try:
        params, var_kw = plugin_params(table, name)
    except RegistryError:
        return None
    return None if var_kw else set(params)


def _build_component(table: str, body: Mapping[str, Any], plugins: Iterable[str] = ()) -> Component:
    body = dict(body)
    name = body.pop("name", COMPONENT_DEFAULTS[table])
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{table}.name = {name!r}: expected a non-empty string")
    names, defaults_of = component_catalog(table)
    others = [p for p in plugins if p != name]
    anyone = set(registered_keys(table))
    declared = [_declared(table, p) for p in others]
    anything = None in declared  # a plug-in with **kwargs: another cell's key may be its
    anyone |= set().union(*(d for d in declared if d is not None))
    if is_import_path(name):
        try:  # import it now, so that a bad path fails before anything runs
            defaults, var_kw = plugin_params(table, name)
        except RegistryError as exc:
            raise ConfigError(f"{table}.name = {name!r}: {exc}") from exc
        if var_kw:  # it receives every key and checks them itself
            return Component(name, MappingProxyType(body))
        plugin = True
    elif name in names:
        defaults = {snake_to_kebab(k): v for k, v in defaults_of(name).items()}
        plugin = False
    else:
        raise ConfigError(
            f"{table}.name = {name!r}: unknown {table} {name!r}{_did_you_mean(name, names)}; "
            f"valid: {', '.join(names)}, or an import path 'package.module:attribute'"
        )
    for key in body:
        if key not in defaults and key not in anyone and not anything:
            raise ConfigError(
                f"unknown config key '{table}.{key}'{_did_you_mean(key, set(defaults) | anyone)}; "
                f"{table} {name!r} accepts: {', '.join(sorted(defaults)) or '(no parameters)'}"
            )
    missing = [k for k, v in defaults.items() if v is REQUIRED and k not in body]
    if missing and plugin and table != "strategy":  # a strategy names its own
        raise ConfigError(
            f"{table}.{missing[0]} is required: {table} {name!r} has no default for it"
        )
    checked = {
        k: _check_param(table, k, v, defaults[k], plugin=plugin)
        for k, v in body.items()
        if k in defaults
    }
    return Component(name, MappingProxyType(checked), frozenset(body) - set(defaults))


def _check_param(table: str, key: str, value: Any, default: Any, *, plugin: bool = False) -> Any:
    """A component's parameter, of its default's type and in its range.

    The built-in losses check their own parameters (``min-count`` is a float with
    default 1); a parameter without a default, or with None, takes any value.
    """
    where = f"{table}.{key} = {value!r}"
    if (table == "loss" and not plugin) or default is None or default is REQUIRED:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected {_TYPE_WORDS[bool]} (without quotes)")
    elif isinstance(default, int | float):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = _TYPE_WORDS[int if isinstance(default, int) else float]
            raise ConfigError(f"{where}: expected {kind}")
        if isinstance(default, int):
            if not whole:
                raise ConfigError(f"{where}: expected {_TYPE_WORDS[int]}")
            value = int(value)
        # else an int stays an int where a float is the default (drs-start 5 is a round)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected {_TYPE_WORDS[str]}")
    rule = PARAM_RANGES.get((table, key))
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{where}: must be {rule[1]}")
    return value


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
            in_tables = _tables_with_key(key)
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
        components[table] = _build_component(table, body, (plugins or {}).get(table, ()))

    config = Config(
        values=MappingProxyType(values),
        components=MappingProxyType(components),
        strategy_options=MappingProxyType(strategy_options),
    )
    _check_component_params(config)
    _check_cross_field(config)
    return config


def _check_component_params(config: Config) -> None:
    """Let the loss and the strategy check their own parameters by building them.

    (The partition, dataset and model are checked with the data, before any engine
    starts: :func:`fedimb.preflight.prepare`.)
    """
    import strategies
    from fedimb import losses

    loss, strategy = config.loss, config.strategy
    given = strategy.params.get("momentum", config["momentum"])
    if given != config["momentum"] and strategies.follows_client_momentum(strategy.name):
        raise ConfigError(
            f"strategy.momentum = {given!r}, but the clients train with momentum = "
            f"{config['momentum']!r}: FedNova normalises by the clients' momentum, which "
            "it takes from momentum; drop strategy.momentum"
        )
    try:  # a plug-in is built on real counts, with the data (fedimb.preflight.prepare)
        if not is_import_path(loss.name):
            losses.make_loss(
                loss.name,
                [10] * 3,
                server_round=1,
                num_rounds=config["num-rounds"],
                **loss.kwargs(),
            )
    except (ValueError, TypeError, RegistryError) as exc:
        raise config.component_error("loss", exc) from exc
    kwargs = config.strategy_kwargs()
    try:
        built = strategies.make_strategy(strategy.name, **kwargs)
    except (ValueError, TypeError, RegistryError) as exc:
        raise config.component_error("strategy", exc) from exc
    except Exception as exc:  # a plug-in's own error in its __init__
        if not config.raised_by("strategy", exc):
            raise
        raise config.component_error("strategy", exc) from exc
    try:  # every checkpoint pickles it: fail now, not after the rounds before the first
        if config["checkpoint-every"] > 0:
            pickle.dumps(built)
    except Exception as exc:
        raise ConfigError(
            f"[strategy] {strategy.name} cannot be pickled, which every checkpoint does "
            f"({type(exc).__name__}: {exc}); keep its state in picklable attributes (no "
            "lambdas, local functions, open files or locks)"
        ) from exc
    _check_node_minimums(config, built)
    _check_sampling_applies(config, built, kwargs)


def _check_sampling_applies(config: Config, strategy: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a client sampling the strategy will not do: a plug-in that does not pass
    ``fraction_train`` / ``min_train_nodes`` on to Flower's class keeps its own. Only a
    value the config changes from its default is checked: a plug-in may fix its own.
    ``kwargs``: what the strategy was built with (``strategy_kwargs``)."""
    fields = COMPONENT_OWN_KEYS["strategy"]
    for attr, key in (
        ("fraction_train", "fraction-train"),
        ("min_train_nodes", "min-train-clients"),
    ):
        own, wanted = getattr(strategy, attr, None), kwargs[attr]
        if (
            own is not None
            and own != wanted
            and config.strategy_options[key] != fields[key].default
        ):
            raise ConfigError(
                f"[strategy] {config.strategy.name}: strategy.{key} = {wanted} cannot apply, "
                f"the strategy keeps {attr} = {own}; pass {attr} on to Flower's class in its "
                f"__init__ (or drop strategy.{key})"
            )


def _check_node_minimums(config: Config, strategy: Any) -> None:
    """Flower waits forever for more nodes than the federation has: check the minimums
    the strategy will use (defaults included; evaluation's only when it evaluates)."""
    wanted = ["min_train_nodes", "min_available_nodes"]
    if getattr(strategy, "fraction_evaluate", 0):
        wanted.append("min_evaluate_nodes")
    for attr in wanted:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        name = snake_to_kebab(attr)
        given = name in config.strategy.params
        if not given and attr != "min_evaluate_nodes":
            name, given = "min-train-clients", True  # fedimb's own key sets both
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"strategy.{name} = {value!r}: expected an integer")
        if value > config["num-clients"]:
            raise ConfigError(
                f"strategy.{name} = {value}: must be <= num-clients ({config['num-clients']})"
                + ("" if given else " (the strategy's default)")
            )


def _check_cross_field(config: Config) -> None:
    """Constraints that involve several keys."""
    many, few = config["long-tail.many-shot-above"], config["long-tail.few-shot-below"]
    if few > many + 1:
        raise ConfigError(
            f"long-tail.few-shot-below = {few}: must be <= long-tail.many-shot-above + 1 "
            f"({many + 1}), or a class would be both many-shot and few-shot"
        )
    part = config.partition
    cpc = part.params.get("classes-per-client")
    if isinstance(cpc, int) and cpc < 1:
        raise ConfigError(f"partition.classes-per-client = {cpc}: must be an integer >= 1")
    for key in ("raise-clients", "nan-clients", "slow-clients", "rounds"):
        text = config[f"faults.{key}"]
        try:
            ids = parse_id_list(text)
        except ValueError:
            raise ConfigError(
                f"faults.{key} = {text!r}: expected comma-separated integers, e.g. '0,3'"
            ) from None
        # A fault that can never fire would let a robustness test pass unexercised.
        first, last = (
            (1, config["num-rounds"]) if key == "rounds" else (0, config["num-clients"] - 1)
        )
        outside = sorted(i for i in ids if not first <= i <= last)
        if outside:
            what = "rounds" if key == "rounds" else "client ids (partition ids)"
            raise ConfigError(
                f"faults.{key} = {text!r}: {outside[0]} is outside {first}..{last}, "
                f"the run's {what}"
            )
    warmup = config["lr-schedule.warmup-rounds"]
    if warmup > config["num-rounds"]:
        raise ConfigError(
            f"lr-schedule.warmup-rounds = {warmup}: must be <= num-rounds "
            f"({config['num-rounds']}), or the run ends before the full lr"
        )
    try:
        keep = class_keep_fractions(config)
    except ValueError as exc:
        raise ConfigError(f"long-tail.keep = {config['long-tail.keep']!r}: {exc}") from None
    if keep and config["long-tail.ratio"] > 1:
        raise ConfigError(
            f"long-tail.keep and long-tail.ratio = {config['long-tail.ratio']} both set: "
            "give the imbalance one way (ratio for a profile, keep for per-class fractions)"
        )
    try:
        lr_milestones(config)
    except ValueError as exc:
        text = config["lr-schedule.milestones"]
        raise ConfigError(
            f"lr-schedule.milestones = {text!r}: {in_config_words(str(exc))}"
        ) from None


def class_keep_fractions(config: Config) -> list[float]:
    """``long-tail.keep`` as numbers in (0, 1], one per class ([] when not set)."""
    fractions = []
    for text in filter(None, (t.strip() for t in config["long-tail.keep"].split(","))):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number; e.g. '0.1,1.0'") from None
        if not 0 < value <= 1:
            raise ValueError(f"{text} is outside (0, 1]: a fraction of a class to keep")
        fractions.append(value)
    return fractions


def lr_milestones(config: Config) -> list[int]:
    """The rounds where the learning rate drops, from ``lr-schedule.milestones``: round
    numbers, or fractions of ``num-rounds`` that run before the drop (as ``drw-start``)."""
    rounds = []
    for text in filter(None, (t.strip() for t in config["lr-schedule.milestones"].split(","))):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number; e.g. '150,180' or '0.75,0.9'") from None
        start = int(value) if value.is_integer() else value
        rounds.append(switch_round(start, config["num-rounds"], name="a milestone"))
    return sorted(rounds)


def lr_in_round(config: Config, server_round: int) -> float:
    """The clients' learning rate in ``server_round`` (1-based): ``lr`` on the
    ``[lr-schedule]`` table's :func:`fedimb.schedule.scheduled_lr` (LDAM-DRW's recipe: a
    5-round warm-up, then 100x drops at rounds 161 and 181 of 200)."""
    return scheduled_lr(
        config["lr"],
        server_round,
        milestones=lr_milestones(config),
        gamma=config["lr-schedule.gamma"],
        decay=config["lr-schedule.decay"],
        warmup_rounds=config["lr-schedule.warmup-rounds"],
    )


# Keys that change how a run executes, not its results (the engines, batched or not,
# and any thread count give the same metrics on CPU: tested; cuDNN's kernel choice
# changes only the rounding, as batched training does on a GPU).
EXECUTION_KEYS = frozenset(
    {
        "engine",
        "threads",
        "batched",
        "group-size",
        "cudnn-benchmark",
        "checkpoint-every",
        "loggers",
        "round-timeout",
        "out-dir",
        "ray.address",
        "ray.client-cpus",
        "ray.client-gpus",
    }
)


def config_changes(old: Config, new: Config, *, limit: int = 3, ignore: Iterable[str] = ()) -> str:
    """The keys whose values differ, as ``"num-rounds 3 -> 4, ..."`` ('' if none), leaving
    out :data:`EXECUTION_KEYS` and ``ignore``."""
    return flat_changes(old.to_flat(), new.to_flat(), limit=limit, ignore=ignore)


def flat_changes(
    a: Mapping[str, Any], b: Mapping[str, Any], *, limit: int = 3, ignore: Iterable[str] = ()
) -> str:
    """:func:`config_changes` of two flat configs (``Config.to_flat``)."""
    keys = sorted((a.keys() | b.keys()) - EXECUTION_KEYS - set(ignore))
    changed = [k for k in keys if a.get(k) != b.get(k)]
    shown = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(shown) + more


def parse_id_list(text: str) -> frozenset[int]:
    """``"0, 3"`` -> ``{0, 3}``; ``""`` -> empty."""
    return frozenset(int(t) for t in text.split(",") if t.strip())
