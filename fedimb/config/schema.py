"""The config's schema: every key, its type, default and allowed values.

Top-level scalars (:data:`TOP_LEVEL`), tables with fixed keys (:data:`FIXED_TABLES`) and
the component tables (:data:`COMPONENT_DEFAULTS`, whose other keys the named component
defines). A new run-level key is one :class:`Field` here. The type and range checks of a
field's value live here too, so the schema and its rules read as one.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedimb.engines import engine_names

# fedimb's shipped configs: inside the package in an installed wheel (setup.py maps
# configs/ to fedimb/configs), else beside it, in a checkout or an editable install.
_PACKAGE = Path(__file__).resolve().parent.parent
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


# Run-level keys that components' errors name as their arguments.
RUN_WORDS = ("num_rounds", "num_clients")


def kebab_to_snake(key: str) -> str:
    """``max-m`` -> ``max_m``."""
    return key.replace("-", "_")


def snake_to_kebab(key: str) -> str:
    """``max_m`` -> ``max-m``."""
    return key.replace("_", "-")


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
