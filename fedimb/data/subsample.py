"""A seeded subsample of the training data, for a quick look on a CPU.

Applied after the global long tail and before the partition (``[subsample]`` in the
config): each class keeps ``fraction`` of its samples (at least one), then at most
``per-class-cap`` of them, chosen at random within the class, so the class balance
the long tail made stays as it was (up to the cap).
"""

from __future__ import annotations

import numpy as np

# Config keys of the step (results-changing: they join the federation's DATA_KEYS).
SUBSAMPLE_KEYS = ("subsample.fraction", "subsample.per-class-cap")


def subsample(
    labels: np.ndarray,
    keep: np.ndarray,
    rng: np.random.Generator,
    *,
    fraction: float = 1.0,
    per_class_cap: int = 0,
) -> np.ndarray:
    """The sorted indices of ``keep`` (indices into ``labels``) that the subsample keeps.

    Parameters
    ----------
    labels : np.ndarray
        Every training sample's class label, shape ``[N]``.
    keep : np.ndarray
        Indices into ``labels`` in use so far (after the long tail).
    rng : np.random.Generator
        The subsample's own seeded stream.
    fraction : float
        Share of each class to keep, in (0, 1]; at least one sample per class.
    per_class_cap : int
        Most samples per class after the fraction (0 = no cap).
    """
    if fraction >= 1 and per_class_cap == 0:
        return keep  # nothing drawn: the rng's stream stays unused
    chosen = []
    for cls in np.unique(labels[keep]):
        members = keep[labels[keep] == cls]
        count = max(1, round(fraction * len(members)))
        if per_class_cap:
            count = min(count, per_class_cap)
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))
