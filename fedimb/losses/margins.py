"""Losses that move the logits: LDAM's margins, the log-prior offsets of balanced
softmax, logit adjustment and FedLC, and FedRS's scaling of absent classes.

Each factory's keyword defaults are the loss's config defaults. LDAM's margins assume a
cosine-normalised classifier: :data:`COSINE_HEAD_LOSSES` turn the model's cosine head on
unless the config sets it (:func:`fedimb.federation.model_kwargs`).
"""

from __future__ import annotations

import numpy as np

from fedimb.losses.family import LossParams
from fedimb.losses.params import drw_weights, keep_mask, ldam_margins, loss_params, offsets
from fedimb.losses.registry import LOSSES
from fedimb.schedule import Rounds

# Losses that assume a cosine-normalised classifier; it is on for them unless set.
COSINE_HEAD_LOSSES = ("ldam", "ldam-drw")


@LOSSES.register("ldam")
def _ldam(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    max_m: float = 0.5,
    missing: str = "present",
    min_count: float = 1,
    drw_start: int | float | None = None,
    drw_beta: float = 0.9999,
) -> LossParams:
    weight = drw_weights(counts, rounds, drw_start, drw_beta, missing, min_count)
    margin = ldam_margins(counts, max_m, missing, min_count)
    return loss_params(counts, weight=weight, margin=margin, keep=keep_mask(counts, missing))


@LOSSES.register("ldam-drw")
def _ldam_drw(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    max_m: float = 0.5,
    missing: str = "present",
    min_count: float = 1,
    drw_start: int | float | None = 0.8,
    drw_beta: float = 0.9999,
) -> LossParams:
    # LDAM with DRW on by default: the last 20% of rounds re-weighted, as Cao et al.
    return _ldam(
        counts,
        rounds,
        max_m=max_m,
        missing=missing,
        min_count=min_count,
        drw_start=drw_start,
        drw_beta=drw_beta,
    )


@LOSSES.register("balanced-softmax")
def _balanced_softmax(
    counts: np.ndarray, rounds: Rounds, *, missing: str = "present", min_count: float = 1
) -> LossParams:
    offset = offsets(counts, np.log, missing, min_count)
    return loss_params(counts, offset=offset, keep=keep_mask(counts, missing))


@LOSSES.register("logit-adjusted")
def _logit_adjusted(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    tau: float = 1.0,
    missing: str = "present",
    min_count: float = 1,
) -> LossParams:
    present = counts > 0

    def log_prior(n: np.ndarray) -> np.ndarray:
        # The prior is over the classes the counts cover (placeholders excluded).
        total = n.sum() if missing == "clamp" else n[present].sum()
        return tau * np.log(n / total)

    offset = offsets(counts, log_prior, missing, min_count)
    return loss_params(counts, offset=offset, keep=keep_mask(counts, missing))


@LOSSES.register("fedrs")
def _fedrs(counts: np.ndarray, rounds: Rounds, *, alpha: float = 0.5) -> LossParams:
    return loss_params(counts, scale=np.where(counts > 0, 1.0, alpha))


@LOSSES.register("fedlc")
def _fedlc(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    tau: float = 1.0,
    missing: str = "clamp",
    min_count: float = 1,
) -> LossParams:
    offset = offsets(counts, lambda n: -tau * np.power(n, -0.25), missing, min_count)
    return loss_params(counts, offset=offset, keep=keep_mask(counts, missing))
