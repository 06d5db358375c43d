"""Round schedules shared by the losses, the samplers and the learning rate.

:func:`check_rounds` validates a (round, number of rounds) pair; :func:`switch_round`
turns a deferred schedule's start (DRW's ``drw_start``, DRS's ``drs_start``, an lr
milestone), given as a round or as the fraction of the run before it, into its round;
:func:`scheduled_lr` is the learning rate of a round (warm-up, decay, drops), and
:func:`lr_in_round` that of a config's ``[lr-schedule]`` table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # only a type: the config package imports this module
    from fedimb.config import Config

__all__ = [
    "Rounds",
    "check_rounds",
    "lr_in_round",
    "lr_milestones",
    "scheduled_lr",
    "switch_round",
]


class Rounds(NamedTuple):
    """A checked ``server_round`` (1-based) and ``num_rounds``."""

    server_round: int
    num_rounds: int


def is_int(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rounds(server_round: Any, num_rounds: Any) -> Rounds:
    """``(server_round, num_rounds)`` as :class:`Rounds`, or ValueError: both ints,
    ``1 <= server_round <= num_rounds``."""
    if not is_int(num_rounds) or num_rounds < 1:
        raise ValueError(f"num_rounds must be an int >= 1, got {num_rounds!r}")
    if not is_int(server_round) or not 1 <= server_round <= num_rounds:
        raise ValueError(
            f"server_round must be an int in [1, num_rounds={num_rounds}], got {server_round!r}"
        )
    return Rounds(int(server_round), int(num_rounds))


def switch_round(
    start: int | float | None, num_rounds: int, *, name: str = "drw_start"
) -> int | None:
    """The first round (1-based) of a deferred schedule (DRW, DRS), or None when off.

    Parameters
    ----------
    start : int, float or None
        An int >= 1 is the round itself; a float in (0, 1) is the fraction of
        ``num_rounds`` that runs before the switch: round ``floor(start * num_rounds) + 1``
        (0.8 of 200 rounds -> round 161, as LDAM-DRW's reference code switches at its
        epoch 160 of 0-199: the last 20% are deferred).
    num_rounds : int
        Total number of rounds.
    name : str
        Parameter name for error messages.

    Raises
    ------
    ValueError
        For a bool, a non-number, an int < 1, a float outside (0, 1), or a round after the
        last one.
    """
    if start is None:
        return None
    if is_int(start):
        if start < 1:
            raise ValueError(
                f"{name} must be a round number >= 1 or a fraction in (0, 1), got {start!r}"
            )
        first = int(start)
    elif is_real(start):
        if not (math.isfinite(start) and 0 < start < 1):
            raise ValueError(
                f"{name} as a float is the fraction of num_rounds before the switch, in "
                f"(0, 1), got {start!r} (use an int for a round number)"
            )
        first = math.floor(float(start) * num_rounds + 1e-9) + 1  # 1e-9: 0.29*100 -> 29
    else:
        raise ValueError(
            f"{name} must be None, an int round number >= 1 or a fraction in (0, 1), got {start!r}"
        )
    if first > num_rounds:
        raise ValueError(
            f"{name}={start!r} starts at round {first}, after the last round "
            f"(num_rounds={num_rounds})"
        )
    return first


def scheduled_lr(
    lr: float,
    server_round: int,
    *,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    decay: float = 1.0,
    warmup_rounds: int = 0,
) -> float:
    """The learning rate in ``server_round`` (1-based) of a run whose base rate is ``lr``.

    ``lr`` times ``decay`` per round after the first, times ``gamma`` per milestone
    reached (the round where a drop starts), times ``r / warmup_rounds`` in the warm-up
    rounds ``r <= warmup_rounds``: Cao et al.'s ``lr * (epoch + 1) / 5`` over epochs 0-4
    with ``warmup_rounds = 5``, one round being one epoch. The factors multiply.
    """
    drops = sum(server_round >= m for m in milestones)
    rate = lr * decay ** (server_round - 1) * gamma**drops
    return rate * server_round / warmup_rounds if server_round <= warmup_rounds else rate


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
