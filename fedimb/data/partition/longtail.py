"""A global class imbalance applied before partitioning: :func:`long_tail` (CIFAR-10-LT
style, Cao et al. 2019) and :func:`keep_fractions` (a keep fraction per class, as
imbalanced IMDB)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedimb.data.partition.core import check_labels

LONG_TAIL_PROFILES = ("exp", "step")


def long_tail(
    labels: np.ndarray, ratio: float, rng: np.random.Generator, profile: str = "exp"
) -> np.ndarray:
    """Indices of a long-tailed subset, as CIFAR-10-LT is built (Cao et al., 2019).

    With ``C`` classes (those present, ascending) and ``n_max`` the smallest original
    class count (so every class can supply its quota), class ``i`` keeps
    ``floor(n_max * ratio ** (-i / (C - 1)))`` samples for ``profile="exp"``, or
    ``n_max`` for the first ``C // 2`` classes and ``floor(n_max / ratio)`` for the rest
    for ``profile="step"``; at least one sample per class. Kept samples are chosen at
    random within each class.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]``.
    ratio : float
        Imbalance ratio ``rho = n_max / n_min`` (>= 1; 1 keeps ``n_max`` per class).
    rng : np.random.Generator
        Source of randomness.
    profile : {"exp", "step"}
        Shape of the tail.

    Returns
    -------
    np.ndarray
        Sorted indices of the kept samples.

    Raises
    ------
    ValueError
        If ``ratio < 1`` or ``profile`` is unknown.
    """
    labels = check_labels(labels)
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if profile not in LONG_TAIL_PROFILES:
        raise ValueError(f"profile must be one of {LONG_TAIL_PROFILES}, got {profile!r}")
    if labels.size == 0:
        return np.empty(0, np.int64)
    present, counts = np.unique(labels, return_counts=True)
    quotas = long_tail_counts(int(counts.min()), present.size, ratio, profile)
    kept = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(present, quotas, strict=True)
    ]
    return np.sort(np.concatenate(kept).astype(np.int64))


def keep_fractions(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Indices of a subset keeping ``fractions[c]`` of class ``c``'s samples (at least
    one), chosen at random within each class: an imbalance set class by class, as Cao et
    al. (2019) keep a tenth of IMDB's negative reviews.

    Raises
    ------
    ValueError
        If there is not one fraction in (0, 1] per class.
    """
    labels = check_labels(labels)
    fractions = np.asarray(fractions, dtype=np.float64)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if fractions.ndim != 1 or fractions.size != num_classes:
        raise ValueError(
            f"expected one keep fraction per class ({num_classes} classes), got {fractions.size}"
        )
    if not np.all((fractions > 0) & (fractions <= 1)):
        raise ValueError(f"keep fractions must be in (0, 1], got {fractions.tolist()}")
    kept = []
    for c, fraction in enumerate(fractions):
        members = np.flatnonzero(labels == c)
        if members.size:
            quota = max(1, int(np.floor(fraction * members.size + 1e-9)))
            kept.append(rng.choice(members, size=quota, replace=False))
    return np.sort(np.concatenate(kept).astype(np.int64)) if kept else np.empty(0, np.int64)


def long_tail_counts(n_max: int, num_classes: int, ratio: float, profile: str) -> np.ndarray:
    """Per-class quotas of :func:`long_tail` (exposed for tests and reports)."""
    i = np.arange(num_classes)
    if profile == "exp":
        # C == 1 has no tail; avoid 0/0 in the exponent.
        expo = -i / (num_classes - 1) if num_classes > 1 else np.zeros(1)
        raw = n_max * np.power(float(ratio), expo)
    elif profile == "step":
        raw = np.where(i < num_classes // 2, float(n_max), n_max / float(ratio))
    else:
        raise ValueError(f"profile must be one of {LONG_TAIL_PROFILES}, got {profile!r}")
    # A tiny epsilon keeps exact powers (e.g. 100 * 10**-1 = 9.999...) from flooring down.
    return np.maximum(np.floor(raw + 1e-9).astype(np.int64), 1)
