"""From a client's label counts to the per-class vectors of a loss.

Validation of the counts and of each loss parameter (one validator per parameter name,
:data:`PARAM_CHECKS`: a name means the same thing in every loss), and the statistics
that the built-in losses share: class weights, LDAM margins, log-prior offsets, the DRW
schedule, each under a missing-class policy (:data:`MISSING_POLICIES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedimb.losses.family import LossParams
from fedimb.schedule import Rounds, is_real, switch_round

MISSING_POLICIES = ("present", "clamp", "mask")


def validate_counts(class_counts: Any) -> np.ndarray:
    """``class_counts`` as a 1-D int64 array, or ValueError (negative, all zero, ...)."""
    if isinstance(class_counts, Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    if (
        isinstance(class_counts, np.ndarray)
        and class_counts.dtype.kind in "iu"  # whole numbers already: the checks below, fast
        and class_counts.ndim == 1
        and class_counts.size >= 2
        and class_counts.min() >= 0
        and class_counts.sum() > 0
    ):
        return class_counts.astype(np.int64)
    try:
        raw = np.asarray(class_counts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"class_counts must be numbers, got {class_counts!r}") from exc
    if raw.ndim != 1 or raw.size < 2:
        raise ValueError(
            f"class_counts must be a 1-D sequence of one count per class (at least 2), got "
            f"shape {raw.shape}"
        )
    if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
        raise ValueError(f"class_counts must be whole numbers, got {raw.tolist()}")
    if np.any(raw < 0):
        raise ValueError(f"class_counts must be >= 0, got {raw.tolist()}")
    if raw.sum() == 0:
        raise ValueError("class_counts are all zero: the client has no samples")
    return raw.astype(np.int64)


def _in_range(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        ok = is_real(value) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo)
        ok = ok and (value < hi if hi_open else value <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
        return float(value)

    return check


def _choice(allowed: Sequence[str]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError(
                f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value

    return check


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


_INF = math.inf
_positive = _in_range(0, _INF, lo_open=True, hi_open=True)


def _scale(name: str, value: Any) -> float | None:
    # None: chosen by the caller, which knows the classifier (see make_loss).
    return None if value is None else _positive(name, value)


def _schedule_start(name: str, value: Any) -> int | float | None:
    # Checked against num_rounds when the loss is built (switch_round).
    if value is None or is_real(value):
        return value
    raise ValueError(f"{name} must be None, an int round or a fraction in (0, 1), got {value!r}")


# One validator per parameter name: a name means the same thing in every loss.
PARAM_CHECKS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType(
    {
        "beta": _in_range(0, 1, hi_open=True),
        "drw_beta": _in_range(0, 1, hi_open=True),
        "gamma": _in_range(0, _INF, hi_open=True),
        "s": _scale,
        "max_m": _positive,
        "min_count": _positive,
        "alpha": _in_range(0, 1),
        "tau": _in_range(0, _INF, hi_open=True),
        "missing": _choice(MISSING_POLICIES),
        "base": _choice(("softmax", "sigmoid", "focal")),
        "drw_start": _schedule_start,
        "prior_init": _boolean,
    }
)


# --------------------------------------------------------------------------- statistics
# Each helper maps counts (and a missing-class policy) to one per-class numpy vector,
# in float64; LossParams stores float32.


def class_weights(
    counts: np.ndarray, raw: Callable[[np.ndarray], np.ndarray], missing: str, min_count: float
) -> np.ndarray:
    """Weights ``raw(n)`` normalised to mean 1 (sum C) over the classes they cover."""
    if missing == "clamp":
        w = raw(np.maximum(counts, min_count).astype(np.float64))
        return w * len(w) / w.sum()
    present = counts > 0
    w = np.ones(len(counts))
    wp = raw(counts[present].astype(np.float64))
    w[present] = wp * len(wp) / wp.sum()
    return w


def cb_raw(beta: float) -> Callable[[np.ndarray], np.ndarray]:
    """Cui et al.'s inverse effective number (1 - beta) / (1 - beta**n)."""
    return lambda n: (1.0 - beta) / (1.0 - np.power(beta, n))


def ldam_margins(counts: np.ndarray, max_m: float, missing: str, min_count: float) -> np.ndarray:
    """``n**-1/4`` scaled so that the largest margin (over covered classes) is ``max_m``."""
    if missing == "clamp":
        m = np.power(np.maximum(counts, min_count).astype(np.float64), -0.25)
        return m * (max_m / m.max())
    present = counts > 0
    m = np.zeros(len(counts))
    mp = np.power(counts[present].astype(np.float64), -0.25)
    m[present] = mp * (max_m / mp.max())
    return m


def offsets(
    counts: np.ndarray, raw: Callable[[np.ndarray], np.ndarray], missing: str, min_count: float
) -> np.ndarray:
    """Log-prior style offsets ``raw(n)`` (``raw`` sees the whole count vector)."""
    if missing == "clamp":
        return raw(np.maximum(counts, min_count).astype(np.float64))
    present = counts > 0
    full = np.where(present, counts, 1).astype(np.float64)  # placeholder avoids log 0
    off = np.where(present, raw(full), 0.0)
    if missing == "present":
        # Neutral = a class of typical size: the mean offset of the present classes.
        off[~present] = off[present].mean()
    return off


def keep_mask(counts: np.ndarray, missing: str) -> np.ndarray:
    return counts > 0 if missing == "mask" else np.ones(len(counts), dtype=bool)


def drw_weights(
    counts: np.ndarray,
    rounds: Rounds,
    drw_start: int | float | None,
    drw_beta: float,
    missing: str,
    min_count: float,
) -> np.ndarray:
    """Ones before the DRW switch round, class-balanced weights from it on."""
    first = switch_round(drw_start, rounds.num_rounds, name="drw_start")
    if first is None or rounds.server_round < first:
        return np.ones(len(counts))
    return class_weights(counts, cb_raw(drw_beta), missing, min_count)


def loss_params(
    counts: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    margin: np.ndarray | None = None,
    keep: np.ndarray | None = None,
    s: float = 1.0,
    gamma: float = 0.0,
    base: str = "softmax",
) -> LossParams:
    """LossParams from numpy vectors; unspecified ones are neutral.

    Equal vectors give the same (shared, never modified) LossParams: every client of a
    run builds its loss each round, mostly from vectors seen before (its own, or the
    neutral ones), and four tensor conversions cost more than the statistics.
    """
    c = len(counts)
    vectors = np.stack(
        [
            np.full(c, fill) if v is None else np.asarray(v, dtype=np.float64)
            for v, fill in ((weight, 1.0), (offset, 0.0), (scale, 1.0), (margin, 0.0))
        ]
    )
    keep_mask = np.ones(c, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    key = (vectors.tobytes(), keep_mask.tobytes(), float(s), float(gamma), base)
    cached = _PARAMS_MADE.get(key)
    if cached is not None:
        return cached
    for arr in vectors:
        if not np.all(np.isfinite(arr)):  # a bug guard: the policies above exclude this
            raise ValueError(
                f"non-finite loss statistics {arr.tolist()} for counts {counts.tolist()}"
            )
    as_float = torch.as_tensor(vectors, dtype=torch.float32)
    made = LossParams(
        weight=as_float[0],
        offset=as_float[1],
        scale=as_float[2],
        margin=as_float[3],
        mask=torch.as_tensor(keep_mask),
        s=float(s),
        gamma=float(gamma),
        base=base,
    )
    if len(_PARAMS_MADE) >= 4096:  # many distinct clients: drop the oldest
        _PARAMS_MADE.pop(next(iter(_PARAMS_MADE)))
    _PARAMS_MADE[key] = made
    return made


_PARAMS_MADE: dict[tuple[Any, ...], LossParams] = {}
