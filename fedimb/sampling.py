"""Local re-sampling: the order of one local epoch over a client's own samples.

:func:`epoch_indices` returns indices into the client's samples (``labels`` holds the
client's labels). Counts ``n_j`` are those of the client; only present classes
(``n_j > 0``) are ever drawn.

``instance``
    A permutation: every sample once.
``class-balanced``
    ``len(labels)`` draws with replacement, sample ``i`` with probability proportional to
    ``1 / n_{y_i}``: every present class equally likely, uniform within a class.
``sqrt``
    ``len(labels)`` draws with replacement, class ``j`` with probability proportional to
    ``sqrt(n_j)``, uniform within a class.
``undersample``
    Each present class cut to the smallest present count (drawn without replacement),
    shuffled: ``min_j n_j * (number of present classes)`` indices.
``drs``
    Deferred re-sampling (Cao et al. 2019): ``instance`` before round ``drs_start``,
    ``class-balanced`` from it on. ``drs_start`` is an int round (>= 1) or a fraction of
    ``num_rounds`` before the switch, in (0, 1) (round ``floor(drs_start * num_rounds) + 1``),
    default 0.8; see
    :func:`fedimb.schedule.switch_round`.

A user sampler is an import path ``"pkg.mod:fn"`` called as
``fn(labels, rng, server_round=..., num_rounds=...)`` that returns 1-D indices into
``labels``. Everything draws from the ``rng`` passed in: same generator state, same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedimb.data.partition import check_labels, checked_indices
from fedimb.registry import Registry
from fedimb.schedule import check_rounds, switch_round

__all__ = ["DRS_DEFAULT_START", "epoch_indices", "list_samplers", "sampler_params"]

DRS_DEFAULT_START = 0.8

_Sampler = Callable[[np.ndarray, np.random.Generator], np.ndarray]
_SAMPLERS: Registry[_Sampler] = Registry("sampler")


def _present(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Present classes and their counts."""
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    return present, counts[present]


def _within_class(labels: np.ndarray, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uniformly drawn sample index of each class in ``classes`` (with replacement)."""
    order = np.argsort(labels, kind="stable")  # indices grouped by class
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    return order[starts[classes] + rng.integers(0, counts[classes])]


@_SAMPLERS.register("instance")
def _instance(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(len(labels))


@_SAMPLERS.register("class-balanced")
def _class_balanced(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    present, _ = _present(labels)
    classes = present[rng.integers(0, len(present), size=len(labels))]
    return _within_class(labels, classes, rng)


@_SAMPLERS.register("sqrt")
def _sqrt(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    present, counts = _present(labels)
    prob = np.sqrt(counts)
    classes = present[rng.choice(len(present), size=len(labels), p=prob / prob.sum())]
    return _within_class(labels, classes, rng)


@_SAMPLERS.register("undersample")
def _undersample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    present, counts = _present(labels)
    keep = int(counts.min())
    kept = [rng.choice(np.flatnonzero(labels == c), size=keep, replace=False) for c in present]
    return rng.permutation(np.concatenate(kept))


# DRS is resolved to instance / class-balanced in epoch_indices (it needs the round);
# registered so that it is listed and did-you-mean finds it.
_SAMPLERS.register("drs")(_class_balanced)


def list_samplers() -> list[str]:
    """Names of the built-in samplers, sorted."""
    return _SAMPLERS.names()


def sampler_params(name: str) -> dict[str, Any]:
    """A built-in sampler's parameters with their defaults (only ``drs`` has one)."""
    return {"drs_start": DRS_DEFAULT_START} if name == "drs" else {}


def epoch_indices(
    name: str,
    labels: Any,
    rng: np.random.Generator,
    *,
    server_round: int = 1,
    num_rounds: int = 1,
    drs_start: int | float | None = None,
    **params: Any,
) -> np.ndarray:
    """The order of one local epoch, as int64 indices into the client's samples.

    Parameters
    ----------
    name : str
        A sampler of :func:`list_samplers` or an import path ``"pkg.mod:fn"``.
    labels : array-like of int
        The client's labels (>= 0).
    rng : numpy.random.Generator
        The only source of randomness.
    server_round, num_rounds : int
        1-based current round and total rounds (for ``drs``).
    drs_start : int, float or None
        ``drs`` only: switch round or fraction of ``num_rounds`` (None = 0.8).
    **params
        A user sampler's own keyword parameters (the built-in ones take none).

    Raises
    ------
    ValueError
        Unknown name (``RegistryError``), bad labels or rounds, ``drs_start`` out of range or
        given to a sampler other than ``drs``, a user sampler returning bad indices.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(name, str):
        raise ValueError(f"sampler name must be a string, got {name!r}")
    labels = check_labels(labels)
    check_rounds(server_round, num_rounds)
    if name == "drs":
        start = DRS_DEFAULT_START if drs_start is None else drs_start
        first = switch_round(start, num_rounds, name="drs_start")
        name = "instance" if server_round < first else "class-balanced"
    elif drs_start is not None:
        raise ValueError(
            f"drs_start={drs_start!r} is a parameter of sampler 'drs' only, not of {name!r}"
        )
    sampler = _SAMPLERS.get(name)  # raises listing the valid names, or imports a path
    if name not in _SAMPLERS:
        return checked_indices(
            sampler(labels, rng, server_round=server_round, num_rounds=num_rounds, **params),
            len(labels),
            f"sampler {name!r}'s epoch",
        )
    if params:
        raise ValueError(f"sampler {name!r} takes no parameter(s) {sorted(params)}")
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    return sampler(labels, rng).astype(np.int64, copy=False)
