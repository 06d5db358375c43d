"""Ranges of strategy parameters that the strategies do not check themselves.

Flower's strategies take any number (a negative ``proximal-mu`` trains, wrongly); the
config checks these when it reads ``[strategy]``. Keys are config (kebab-case) names;
values are ``(rule, what is allowed)``. A new strategy's parameter range goes here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Rule = tuple[Callable[[Any], bool], str]

_POSITIVE: Rule = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE: Rule = (lambda v: v >= 0, "a number >= 0")
_UNIT: Rule = (lambda v: 0 <= v < 1, "a number in [0, 1)")

PARAM_RANGES: dict[str, Rule] = {
    "fraction-evaluate": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "proximal-mu": _NON_NEGATIVE,
    "server-learning-rate": _POSITIVE,
    "server-momentum": _UNIT,
    "momentum": _UNIT,
    "eta": _POSITIVE,
    "eta-l": _POSITIVE,
    "tau": _POSITIVE,
    "beta-1": _UNIT,
    "beta-2": _UNIT,
    "beta": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "q": _NON_NEGATIVE,
    "spreadout-lr": _POSITIVE,
    "spreadout-steps": (lambda v: v >= 0, "an integer >= 0"),
    "num-malicious-nodes": (lambda v: v >= 0, "an integer >= 0"),
    "min-train-nodes": (lambda v: v > 0, "an integer >= 1"),
    "min-evaluate-nodes": (lambda v: v >= 0, "an integer >= 0"),
    "min-available-nodes": (lambda v: v > 0, "an integer >= 1"),
}
