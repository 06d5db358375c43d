"""Losses that re-weight classes (or samples): CE with DRW, inverse frequency,
class-balanced (Cui et al. 2019) and focal.

Each factory's keyword defaults are the loss's config defaults.
"""

from __future__ import annotations

import numpy as np

from fedimb.losses.family import LossParams
from fedimb.losses.params import cb_raw, class_weights, drw_weights, keep_mask, loss_params
from fedimb.losses.registry import LOSSES
from fedimb.schedule import Rounds


@LOSSES.register("ce")
def _ce(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    missing: str = "present",
    min_count: float = 1,
    drw_start: int | float | None = None,
    drw_beta: float = 0.9999,
) -> LossParams:
    weight = drw_weights(counts, rounds, drw_start, drw_beta, missing, min_count)
    return loss_params(counts, weight=weight, keep=keep_mask(counts, missing))


@LOSSES.register("inverse-frequency")
def _inverse_frequency(
    counts: np.ndarray, rounds: Rounds, *, missing: str = "present", min_count: float = 1
) -> LossParams:
    weight = class_weights(counts, lambda n: 1.0 / n, missing, min_count)
    return loss_params(counts, weight=weight, keep=keep_mask(counts, missing))


@LOSSES.register("inverse-sqrt-frequency")
def _inverse_sqrt_frequency(
    counts: np.ndarray, rounds: Rounds, *, missing: str = "present", min_count: float = 1
) -> LossParams:
    weight = class_weights(counts, lambda n: 1.0 / np.sqrt(n), missing, min_count)
    return loss_params(counts, weight=weight, keep=keep_mask(counts, missing))


@LOSSES.register("class-balanced")
def _class_balanced(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    beta: float = 0.9999,
    base: str = "softmax",
    gamma: float = 1.0,
    prior_init: bool = True,
    missing: str = "present",
    min_count: float = 1,
) -> LossParams:
    del prior_init  # it shapes the global model's initial biases: initial_bias
    weight = class_weights(counts, cb_raw(beta), missing, min_count)
    # gamma only shapes the focal base; softmax / sigmoid CB have no focal term.
    return loss_params(
        counts,
        weight=weight,
        keep=keep_mask(counts, missing),
        base="softmax" if base == "softmax" else "sigmoid",
        gamma=gamma if base == "focal" else 0.0,
    )


@LOSSES.register("class-balanced-focal")
def _class_balanced_focal(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    beta: float = 0.9999,
    gamma: float = 1.0,
    prior_init: bool = True,
    missing: str = "present",
    min_count: float = 1,
) -> LossParams:
    # Cui et al.'s CB Focal under a name of its own: a sweep over loss.name then holds it
    # beside class-balanced softmax re-weighting (one [loss] table cannot give both bases).
    return _class_balanced(
        counts,
        rounds,
        base="focal",
        beta=beta,
        gamma=gamma,
        prior_init=prior_init,
        missing=missing,
        min_count=min_count,
    )


@LOSSES.register("focal")
def _focal(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    gamma: float = 1.0,
    missing: str = "present",
    min_count: float = 1,
    drw_start: int | float | None = None,
    drw_beta: float = 0.9999,
) -> LossParams:
    weight = drw_weights(counts, rounds, drw_start, drw_beta, missing, min_count)
    return loss_params(counts, weight=weight, keep=keep_mask(counts, missing), gamma=gamma)
