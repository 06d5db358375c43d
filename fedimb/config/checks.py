"""Rules across several keys, and which changes a resumed run may make.

:func:`check_cross_field` runs once per config after each key and component has been
checked alone. :data:`EXECUTION_KEYS` and :func:`config_changes` decide whether a run
can resume from another's checkpoint: only keys that change how it runs, not its
results, may differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fedimb.config.components import in_config_words
from fedimb.config.parsing import parse_id_list
from fedimb.config.schema import ConfigError
from fedimb.schedule import lr_milestones

if TYPE_CHECKING:
    from fedimb.config.build import Config


def check_cross_field(config: Config) -> None:
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
