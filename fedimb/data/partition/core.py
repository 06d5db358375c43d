"""The partitioner registry, :func:`partition` (which checks what a partitioner returns),
and the checks every partitioner shares.

A partitioner is ``fn(labels, num_clients, rng, **params) -> list of index arrays``,
registered with ``@PARTITIONERS.register("name")`` or named by import path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedimb.registry import Registry, callable_params

Partitioner = Callable[..., list[np.ndarray]]

PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def check_labels(labels: Any) -> np.ndarray:
    """``labels`` as a 1-D int64 array of non-negative class indices, or ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per sample), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    _check_int("num_clients", num_clients, 1)
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of samples ({num_samples}): "
            "some client would get no data; use at most as many clients as samples"
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_no_empty(parts: list[np.ndarray], hint: str) -> None:
    empty = [i for i, p in enumerate(parts) if p.size == 0]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"client(s) {shown} would get no data: {hint}")


def _sorted_parts(parts: list[list[np.ndarray]] | list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate each client's pieces and sort, so the output is order-independent."""
    out = []
    for pieces in parts:
        arr = np.concatenate(pieces) if isinstance(pieces, list) else pieces
        out.append(np.sort(arr.astype(np.int64, copy=False)))
    return out


def partition_params(name: str) -> dict[str, Any]:
    """Parameters of partitioner ``name`` with their defaults (for config validation).

    Parameters without a default (possible in plug-ins) map to ``REQUIRED``.
    """
    return callable_params(PARTITIONERS.get(name), skip=3)[0]  # skip labels, clients, rng


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    **params: Any,
) -> list[np.ndarray]:
    """Split ``labels`` across ``num_clients`` with the partitioner registered as ``name``.

    Parameters
    ----------
    name : str
        A name in :data:`PARTITIONERS` or an import path ``"pkg.mod:func"`` to a function
        with the signature ``(labels, num_clients, rng, **params)``.
    labels, num_clients, rng
        As for the individual partitioners.
    **params
        Partitioner parameters, snake_case (``classes_per_client``,
        ``shards_per_client``, ``alpha``, ``min_size``, ``max_tries``, ``balance``).

    Raises
    ------
    ValueError
        For an unknown name (listing valid ones) or parameter.
    """
    fn = PARTITIONERS.get(name)
    valid, takes_any = callable_params(fn, skip=3)
    unknown = sorted(set(params) - set(valid))
    if unknown and not takes_any:
        raise ValueError(
            f"unknown parameter(s) {unknown} for partitioner {name!r}; "
            f"valid: {sorted(valid) or 'none'}"
        )
    return _checked_parts(fn(labels, num_clients, rng, **params), len(labels), num_clients, name)


def _checked_parts(parts: Any, num_samples: int, num_clients: int, name: str) -> list[np.ndarray]:
    """A partitioner's output as int64 index arrays, after checking what a plug-in may get
    wrong: one non-empty 1-D array of integer sample indices per client."""
    flat = isinstance(parts, str | bytes) or (isinstance(parts, np.ndarray) and parts.ndim < 2)
    try:
        parts = None if flat else list(parts)  # a list, a tuple, the rows of a 2-D array
    except TypeError:
        parts = None
    if parts is None or len(parts) != num_clients:
        got = f"{len(parts)} parts" if parts is not None else "no sequence of parts"
        raise ValueError(
            f"partitioner {name!r} returned {got} for num-clients = {num_clients}; it must "
            "return one index array per client (e.g. a list)"
        )
    out = [
        checked_indices(part, num_samples, f"partitioner {name!r}: client {i}'s part")
        for i, part in enumerate(parts)
    ]
    _check_no_empty(out, f"partitioner {name!r} must give every client at least one sample")
    return out


def checked_indices(values: Any, n: int, what: str) -> np.ndarray:
    """``values`` as int64 indices into ``n`` samples, or a ValueError that names ``what``
    (a plug-in's output) and says what was wrong."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"{what} has dtype {arr.dtype} and shape {list(arr.shape)}; it must be a 1-D "
            "array of integer sample indices"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = int(arr.min() if arr.min() < 0 else arr.max())
        raise ValueError(f"{what} holds index {bad}, outside the {n} samples (0..{n - 1})")
    return arr.astype(np.int64, copy=False)


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class counts, shape ``[num_clients, num_classes]``, dtype int64.

    Raises
    ------
    ValueError
        If a label is ``>= num_classes``.
    """
    labels = check_labels(labels)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} is too small for label {int(labels.max())}; "
            f"must be > max label"
        )
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, idx in enumerate(parts):
        out[i] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return out
