"""Class-imbalance losses built from one client's own label counts.

Every built-in loss is one member of a single parametric family, described by per-class
tensors and three scalars (:class:`LossParams`) and computed by one pure function
(:func:`imbalance_loss_tensors`). That is what lets an engine train many clients at once
with :func:`torch.func.vmap`, each client with its own loss tensors
(:func:`stack_params`). For logits ``x`` [B, C] and targets ``y`` [B]::

    z   = s * (scale * x - margin[y] * onehot(y)) + offset
    softmax, gamma = 0:  sum_i w[y_i] * CE(z_i, y_i) / sum_i w[y_i]     (F.cross_entropy(weight=w))
    softmax, gamma > 0:  mean_i (1 - exp(-a_i))**gamma * a_i,  a_i = w[y_i] * CE(z_i, y_i)
    sigmoid:             sum_i w[y_i] * sum_j mod_ij * BCE(z_ij, t_ij) / B,
                         mod_ij = exp(-gamma * t_ij * z_ij - gamma * log1p(exp(-z_ij)))

Classes with ``mask = False`` are removed from the softmax (or from the sigmoid sum); the
target class is always kept, so values and gradients stay finite even when a row keeps a
single class.

Built-in losses (``make_loss(name, class_counts, **params)``; ``n_j`` is the client's
count of class ``j``; all equal their published formula when every ``n_j > 0``):

==========================  ==================================================================
``ce``                      cross-entropy
``inverse-frequency``       weights ``1/n_j`` normalised to mean 1
``inverse-sqrt-frequency``  weights ``1/sqrt(n_j)`` normalised to mean 1
``class-balanced``          Cui et al. 2019: ``w_j = (1-beta)/(1-beta**n_j)``; base softmax,
                            sigmoid or (sigmoid) focal (biases start at ``-log(C-1)``:
                            :func:`initial_bias`)
``class-balanced-focal``    ``class-balanced`` with the focal base (Cui et al.'s CB Focal)
``focal``                   softmax focal loss as in the LDAM-DRW reference code
``ldam``, ``ldam-drw``      Cao et al. 2019: margins ``m_j ~ n_j**-1/4``, max ``max_m``
``balanced-softmax``        Ren et al. 2020: ``z_j + log n_j``
``logit-adjusted``          Menon et al. 2021: ``z_j + tau * log(n_j / sum n)``
``fedrs``                   Li & Zhan 2021: logits of classes the client lacks times ``alpha``
``fedlc``                   Zhang et al. 2022: ``z_j - tau * n_j**-1/4``
==========================  ==================================================================

Deferred re-weighting (DRW, Cao et al. 2019) is a schedule, not a loss: ``ce``, ``focal``
and ``ldam`` take ``drw_start`` (``None`` = off). Before the switch round they use no
class weights, from it on class-balanced weights with ``beta = drw_beta``. ``drw_start``
is a round number (int >= 1) or the fraction of ``num_rounds`` that runs unweighted
(float in (0, 1)): 0.8 of 200 rounds re-weights rounds 161-200, the last 20%, as the
reference code does (see :func:`fedimb.schedule.switch_round`).

Logit scale
-----------
Every built-in loss takes ``s`` (default None = 1 on a linear classifier). A cosine
classifier's logits lie in [-1, 1], where a softmax cannot become confident, so for it the
engine passes ``s = COSINE_SCALE`` (30, Cao et al.'s value for LDAM) unless the config sets
``s``: any loss, not LDAM alone, can then be compared on the same head.

Missing classes
---------------
With one or two classes per client most ``n_j`` are 0, where the published formulas give
inf/NaN (``n**-1/4``, ``1 - beta**0``, ``log 0``). Every count-based loss takes
``missing`` (and ``min_count``, default 1):

``"present"``
    Statistics over the present classes only (weights normalised to mean 1 over them,
    LDAM margins scaled so the largest present margin is ``max_m``). An absent class gets
    the neutral value: weight 1 (the mean present weight), margin 0, and for the log-prior
    losses the mean of the present classes' offsets, i.e. it is treated as a class of
    typical size: it stays in the softmax as a negative, exactly as in plain CE.
``"clamp"``
    Counts are clamped to ``min_count`` before the published formula (over all classes).
``"mask"``
    Absent classes are removed from the softmax: the exact ``n_j -> 0`` limit of the
    log-prior formulas (``log 0 = -inf``); a harder form of FedRS's ``alpha -> 0``.
    A one-class client then has a loss identically 0 and learns nothing.

Defaults: ``present`` for every count-based loss but ``fedlc`` (their statistics over the
present classes are the published ones for the data the client has; a one-class client
trains as with plain CE, but for LDAM's margin, relative to the largest: ``max_m``).
``clamp`` for ``fedlc``: it keeps the calibration's direction on the absent classes (they
get the most favourable offset) at a mild strength that ``min_count`` moves toward the
``mask`` limit. ``mask`` (the exact limit of the log-prior
formulas) silences one-class clients entirely; public implementations of these losses are
in effect ``mask``. Measured trade-offs: docs/losses.md.
``fedrs`` takes no ``missing``: the loss *is* a rule for missing classes.

A user loss is an import path ``"pkg.mod:factory"``, called as
``factory(class_counts, server_round=..., num_rounds=..., **params)``; it returns a
:class:`Loss`, a :class:`LossParams` (vectorisable) or any callable
``(logits, targets) -> Tensor`` (not vectorisable: ``Loss.params is None``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedimb.registry import REQUIRED, Registry, callable_params
from fedimb.schedule import Rounds, check_rounds, is_real, switch_round

__all__ = [
    "COSINE_SCALE",
    "MISSING_POLICIES",
    "Loss",
    "LossParams",
    "batched_imbalance_loss",
    "imbalance_loss",
    "imbalance_loss_tensors",
    "list_losses",
    "loss_defaults",
    "make_loss",
    "stack_params",
    "validate_counts",
]

MISSING_POLICIES = ("present", "clamp", "mask")
BASES = ("softmax", "sigmoid")
TENSOR_FIELDS = ("weight", "offset", "scale", "margin", "mask")


# --------------------------------------------------------------------------- the family


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class LossParams:
    """Per-class tensors and scalars that define one member of the loss family.

    Attributes
    ----------
    weight : Tensor
        [..., C] class weights (ones = unweighted).
    offset : Tensor
        [..., C] added to the logits after scaling (log-prior adjustments).
    scale : Tensor
        [..., C] multiplies the logits per class (FedRS).
    margin : Tensor
        [..., C] subtracted from the true-class logit only (LDAM).
    mask : Tensor
        [..., C] bool; False removes the class from the softmax (the target never is).
    s : float
        Global logit scale (LDAM's s).
    gamma : float
        Focal exponent (0 = plain).
    base : str
        ``"softmax"`` or ``"sigmoid"``.
    """

    weight: Tensor
    offset: Tensor
    scale: Tensor
    margin: Tensor
    mask: Tensor
    s: float = 1.0
    gamma: float = 0.0
    base: str = "softmax"

    def __post_init__(self) -> None:
        shape = self.weight.shape
        for name in TENSOR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"LossParams.{name} must be a torch.Tensor, got {type(value)}")
            if value.shape != shape or value.ndim < 1:
                raise ValueError(
                    f"LossParams tensors must share one shape [..., C]: weight is "
                    f"{tuple(shape)}, {name} is {tuple(value.shape)}"
                )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"LossParams.mask must be a bool tensor, got {self.mask.dtype}")
        _check_scalars(self.s, self.gamma, self.base)

    @property
    def num_classes(self) -> int:
        """C, the size of the last dimension."""
        return int(self.weight.shape[-1])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LossParams:
        """A copy on ``device`` with float tensors in ``dtype`` (the mask stays bool)."""
        moved = {f: getattr(self, f).to(device=device, dtype=dtype) for f in TENSOR_FIELDS[:-1]}
        return replace(self, **moved, mask=self.mask.to(device=device))


def _check_scalars(s: float, gamma: float, base: str) -> None:
    if not (isinstance(s, numbers.Real) and math.isfinite(s) and s > 0):
        raise ValueError(f"s must be a finite number > 0, got {s!r}")
    if not (isinstance(gamma, numbers.Real) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")


def imbalance_loss_tensors(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor,
    offset: Tensor,
    scale: Tensor,
    margin: Tensor,
    mask: Tensor,
    *,
    s: float = 1.0,
    gamma: float = 0.0,
    base: str = "softmax",
    valid: Tensor | None = None,
) -> Tensor:
    """The loss family as a pure function of tensors (vmap-able over all tensor arguments).

    Parameters
    ----------
    logits : Tensor
        [B, C] raw model outputs (computed in at least float32).
    targets : Tensor
        [B] integer class indices in [0, C).
    weight, offset, scale, margin : Tensor
        [C] float tensors, see :class:`LossParams`.
    mask : Tensor
        [C] bool, False removes a class from the softmax / sigmoid sum.
    s, gamma, base
        Scalars, see :class:`LossParams`. Under vmap they must be shared by all clients.
    valid : Tensor, optional
        [B] bool, False for padding rows: they add nothing to the loss or its gradient and
        are not counted in its mean, so a short batch padded to B rows has the loss of
        the short batch. None: every row counts.

    Returns
    -------
    Tensor
        Scalar loss. Reduction: softmax with ``gamma = 0`` is the weighted mean of
        ``F.cross_entropy(weight=)``; softmax with ``gamma > 0`` is the plain mean of the
        focal terms (LDAM-DRW's focal loss); sigmoid sums over classes and divides by the
        number of rows.
    """
    _check_scalars(s, gamma, base)
    work = torch.promote_types(logits.dtype, torch.float32)  # never reduce in bf16/fp16
    x = logits.to(work)
    onehot = targets.unsqueeze(-1) == torch.arange(x.shape[-1], device=x.device)
    hot = onehot.to(work)
    weight, offset, scale, margin = (
        t.to(device=x.device, dtype=work) for t in (weight, offset, scale, margin)
    )
    # The target always stays: a masked row then still has one finite entry.
    keep = mask.to(device=x.device, dtype=torch.bool) | onehot
    z = s * (scale * x - margin * hot) + offset
    w_y = (weight * hot).sum(-1)
    rows: Tensor | int = x.shape[0] if valid is None else valid.sum()

    def drop_padding(per_row: Tensor) -> Tensor:
        # where, not a product with 0/1: the padding rows' values never enter the sums.
        return per_row if valid is None else torch.where(valid, per_row, 0.0)

    w_y = drop_padding(w_y)
    if base == "softmax":
        ce = torch.logsumexp(torch.where(keep, z, float("-inf")), dim=-1) - (z * hot).sum(-1)
        per_sample = drop_padding(w_y * ce)
        if gamma == 0:
            return per_sample.sum() / w_y.sum()
        # clamp_min: (1-p)**gamma has an infinite slope at p = 1 for gamma < 1, which a
        # one-class masked row hits exactly; the clamp gives it a zero gradient instead.
        one_minus_p = torch.clamp_min(-torch.expm1(-per_sample), torch.finfo(work).tiny)
        return (one_minus_p.pow(gamma) * per_sample).sum() / rows
    bce = F.softplus(z) - hot * z  # BCE-with-logits, stable for large |z|
    if gamma > 0:
        bce = torch.exp(-gamma * (hot * z + F.softplus(-z))) * bce
    bce = torch.where(keep, bce, torch.zeros_like(bce))
    return drop_padding(w_y * bce.sum(-1)).sum() / rows


def imbalance_loss(logits: Tensor, targets: Tensor, p: LossParams) -> Tensor:
    """The loss of ``logits`` [B, C] for ``targets`` [B] under ``p`` (a scalar tensor)."""
    return imbalance_loss_tensors(
        logits,
        targets,
        p.weight,
        p.offset,
        p.scale,
        p.margin,
        p.mask,
        s=p.s,
        gamma=p.gamma,
        base=p.base,
    )


def stack_params(params: Sequence[LossParams]) -> LossParams:
    """Stack K clients' params into [K, C] tensors for vmap.

    Raises
    ------
    ValueError
        If the list is empty, the class counts differ, or s / gamma / base differ (they are
        Python scalars, which vmap cannot map over).
    """
    if not params:
        raise ValueError("stack_params needs at least one LossParams, got an empty list")
    first = params[0]
    for k, p in enumerate(params[1:], start=1):
        if p.weight.shape != first.weight.shape:
            raise ValueError(
                f"stack_params: client {k} has tensors of shape {tuple(p.weight.shape)}, "
                f"client 0 {tuple(first.weight.shape)}"
            )
        for name in ("s", "gamma", "base"):
            if getattr(p, name) != getattr(first, name):
                raise ValueError(
                    f"stack_params: {name} must be equal across clients, got "
                    f"{getattr(first, name)!r} (client 0) and {getattr(p, name)!r} (client {k})"
                )
    stacked = {f: torch.stack([getattr(p, f) for p in params]) for f in TENSOR_FIELDS}
    return replace(first, **stacked)


def batched_imbalance_loss(logits: Tensor, targets: Tensor, stacked: LossParams) -> Tensor:
    """Per-client losses [K] for logits [K, B, C] and targets [K, B] (vmap over clients)."""

    def one(lg, t, w, o, sc, m, mk):
        return imbalance_loss_tensors(
            lg, t, w, o, sc, m, mk, s=stacked.s, gamma=stacked.gamma, base=stacked.base
        )

    p = stacked.to(device=logits.device)
    return torch.func.vmap(one)(logits, targets, *(getattr(p, f) for f in TENSOR_FIELDS))


class Loss:
    """A loss callable ``(logits, targets) -> scalar`` with its :class:`LossParams`.

    Parameters
    ----------
    params : LossParams, optional
        For members of the family (vectorisable).
    fn : callable, optional
        For any other loss; then ``params`` is None.
    name : str
        For messages and logs.
    """

    def __init__(
        self,
        params: LossParams | None = None,
        fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        name: str = "loss",
    ) -> None:
        if (params is None) == (fn is None):
            raise ValueError("Loss needs exactly one of params (a LossParams) or fn (a callable)")
        self.params = params
        self.fn = fn
        self.name = name
        self._on: dict[torch.device, LossParams] = {}  # params per device, copied once

    @property
    def num_classes(self) -> int | None:
        return None if self.params is None else self.params.num_classes

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.params is None:
            assert self.fn is not None
            return self.fn(logits, targets)
        if logits.shape[-1] != self.params.num_classes:
            raise ValueError(
                f"loss {self.name!r} was built from class_counts of length "
                f"{self.params.num_classes} but got logits with {logits.shape[-1]} classes"
            )
        p = self._on.get(logits.device)
        if p is None:
            p = self._on[logits.device] = self.params.to(device=logits.device)
        return imbalance_loss(logits, targets, p)

    def __repr__(self) -> str:
        kind = "vectorisable" if self.params is not None else "custom"
        return f"Loss({self.name!r}, {kind})"


# --------------------------------------------------------------------------- validation


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
_CHECKS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType(
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


def _class_weights(
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


def _cb_raw(beta: float) -> Callable[[np.ndarray], np.ndarray]:
    """Cui et al.'s inverse effective number (1 - beta) / (1 - beta**n)."""
    return lambda n: (1.0 - beta) / (1.0 - np.power(beta, n))


def _ldam_margins(counts: np.ndarray, max_m: float, missing: str, min_count: float) -> np.ndarray:
    """``n**-1/4`` scaled so that the largest margin (over covered classes) is ``max_m``."""
    if missing == "clamp":
        m = np.power(np.maximum(counts, min_count).astype(np.float64), -0.25)
        return m * (max_m / m.max())
    present = counts > 0
    m = np.zeros(len(counts))
    mp = np.power(counts[present].astype(np.float64), -0.25)
    m[present] = mp * (max_m / mp.max())
    return m


def _offsets(
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


def _keep(counts: np.ndarray, missing: str) -> np.ndarray:
    return counts > 0 if missing == "mask" else np.ones(len(counts), dtype=bool)


def _drw_weights(
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
    return _class_weights(counts, _cb_raw(drw_beta), missing, min_count)


def _params(
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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _LossSpec:
    build: Callable[..., LossParams]
    defaults: Mapping[str, Any]

    def resolve(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for loss "
                f"{name!r}; valid parameters: {valid}"
            )
        values = {**self.defaults, **params}
        return {k: _CHECKS[k](k, v) for k, v in values.items()}


COSINE_SCALE = 30.0  # s for cosine logits unless set (Cao et al.'s NormedLinear + LDAM)
_LOSSES: Registry[_LossSpec] = Registry("loss")
_SCALE = {"s": None}  # every built-in loss takes the logit scale s (make_loss applies it)
_MISSING = {"min_count": 1}
_DRW = {"drw_start": None, "drw_beta": 0.9999}


def _register(
    name: str, **defaults: Any
) -> Callable[[Callable[..., LossParams]], Callable[..., LossParams]]:
    def decorator(build: Callable[..., LossParams]) -> Callable[..., LossParams]:
        unchecked = set(defaults) - set(_CHECKS)
        assert not unchecked, f"no validator for {unchecked}"
        spec = _LossSpec(build, MappingProxyType({**defaults, **_SCALE}))
        _LOSSES.register(name)(spec)
        return build

    return decorator


@_register("ce", missing="present", **_MISSING, **_DRW)
def _ce(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    missing: str,
    min_count: float,
    drw_start: int | float | None,
    drw_beta: float,
) -> LossParams:
    weight = _drw_weights(counts, rounds, drw_start, drw_beta, missing, min_count)
    return _params(counts, weight=weight, keep=_keep(counts, missing))


@_register("inverse-frequency", missing="present", **_MISSING)
def _inverse_frequency(
    counts: np.ndarray, rounds: Rounds, *, missing: str, min_count: float
) -> LossParams:
    weight = _class_weights(counts, lambda n: 1.0 / n, missing, min_count)
    return _params(counts, weight=weight, keep=_keep(counts, missing))


@_register("inverse-sqrt-frequency", missing="present", **_MISSING)
def _inverse_sqrt_frequency(
    counts: np.ndarray, rounds: Rounds, *, missing: str, min_count: float
) -> LossParams:
    weight = _class_weights(counts, lambda n: 1.0 / np.sqrt(n), missing, min_count)
    return _params(counts, weight=weight, keep=_keep(counts, missing))


@_register(
    "class-balanced",
    beta=0.9999,
    base="softmax",
    gamma=1.0,
    prior_init=True,
    missing="present",
    **_MISSING,
)
def _class_balanced(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    beta: float,
    base: str,
    gamma: float,
    prior_init: bool,
    missing: str,
    min_count: float,
) -> LossParams:
    del prior_init  # it shapes the global model's initial biases: initial_bias
    weight = _class_weights(counts, _cb_raw(beta), missing, min_count)
    # gamma only shapes the focal base; softmax / sigmoid CB have no focal term.
    return _params(
        counts,
        weight=weight,
        keep=_keep(counts, missing),
        base="softmax" if base == "softmax" else "sigmoid",
        gamma=gamma if base == "focal" else 0.0,
    )


@_register(
    "class-balanced-focal", beta=0.9999, gamma=1.0, prior_init=True, missing="present", **_MISSING
)
def _class_balanced_focal(counts: np.ndarray, rounds: Rounds, **params: Any) -> LossParams:
    # Cui et al.'s CB Focal under a name of its own: a sweep over loss.name then holds it
    # beside class-balanced softmax re-weighting (one [loss] table cannot give both bases).
    return _class_balanced(counts, rounds, base="focal", **params)


@_register("focal", gamma=1.0, missing="present", **_MISSING, **_DRW)
def _focal(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    gamma: float,
    missing: str,
    min_count: float,
    drw_start: int | float | None,
    drw_beta: float,
) -> LossParams:
    weight = _drw_weights(counts, rounds, drw_start, drw_beta, missing, min_count)
    return _params(counts, weight=weight, keep=_keep(counts, missing), gamma=gamma)


def _ldam(
    counts: np.ndarray,
    rounds: Rounds,
    *,
    max_m: float,
    missing: str,
    min_count: float,
    drw_start: int | float | None,
    drw_beta: float,
) -> LossParams:
    weight = _drw_weights(counts, rounds, drw_start, drw_beta, missing, min_count)
    margin = _ldam_margins(counts, max_m, missing, min_count)
    return _params(counts, weight=weight, margin=margin, keep=_keep(counts, missing))


_LDAM = {"max_m": 0.5, "missing": "present", **_MISSING}
_register("ldam", **_LDAM, **_DRW)(_ldam)
_register("ldam-drw", **_LDAM, **{**_DRW, "drw_start": 0.8})(_ldam)


@_register("balanced-softmax", missing="present", **_MISSING)
def _balanced_softmax(
    counts: np.ndarray, rounds: Rounds, *, missing: str, min_count: float
) -> LossParams:
    offset = _offsets(counts, np.log, missing, min_count)
    return _params(counts, offset=offset, keep=_keep(counts, missing))


@_register("logit-adjusted", tau=1.0, missing="present", **_MISSING)
def _logit_adjusted(
    counts: np.ndarray, rounds: Rounds, *, tau: float, missing: str, min_count: float
) -> LossParams:
    present = counts > 0

    def log_prior(n: np.ndarray) -> np.ndarray:
        # The prior is over the classes the counts cover (placeholders excluded).
        total = n.sum() if missing == "clamp" else n[present].sum()
        return tau * np.log(n / total)

    offset = _offsets(counts, log_prior, missing, min_count)
    return _params(counts, offset=offset, keep=_keep(counts, missing))


@_register("fedrs", alpha=0.5)
def _fedrs(counts: np.ndarray, rounds: Rounds, *, alpha: float) -> LossParams:
    return _params(counts, scale=np.where(counts > 0, 1.0, alpha))


@_register("fedlc", tau=1.0, missing="clamp", **_MISSING)
def _fedlc(
    counts: np.ndarray, rounds: Rounds, *, tau: float, missing: str, min_count: float
) -> LossParams:
    offset = _offsets(counts, lambda n: -tau * np.power(n, -0.25), missing, min_count)
    return _params(counts, offset=offset, keep=_keep(counts, missing))


# --------------------------------------------------------------------------- public API


def list_losses() -> list[str]:
    """Names of the built-in losses, sorted."""
    return _LOSSES.names()


def loss_defaults(name: str) -> dict[str, Any]:
    """Defaults of the parameters of loss ``name`` (snake_case keys).

    For an import path, the keyword defaults of the user factory (without
    ``server_round`` / ``num_rounds``). Unknown names raise ``RegistryError``.
    """
    if name in _LOSSES:
        return dict(_LOSSES.get(name).defaults)
    factory = _LOSSES.get(name)  # imports a path, or raises listing the valid names
    params, _ = callable_params(factory)
    supplied = ("server_round", "num_rounds")
    return {k: v for k, v in params.items() if k not in supplied and v is not REQUIRED}


def initial_bias(name: str, num_classes: int, **params: Any) -> float | None:
    """The value every classifier bias of the initial global model starts at, or None.

    ``class-balanced`` with a sigmoid or focal base, or ``class-balanced-focal`` (and
    ``prior_init``, the default)
    starts each class at the prior probability ``1/C``: bias ``-log(C - 1)``, as Cui et
    al.'s code does after Lin et al. (focal loss). With biases near 0 each of the C
    sigmoids starts at 0.5, and the C - 1 negatives of every sample dominate the first
    steps. Softmax losses are unchanged by a bias common to all classes: None.
    """
    if name not in ("class-balanced", "class-balanced-focal") or num_classes < 2:
        return None
    values = {"base": "focal", **loss_defaults(name), **params}
    if values["base"] == "softmax" or not values["prior_init"]:
        return None
    return -math.log(num_classes - 1)


def make_loss(
    name: str, class_counts: Any, *, server_round: int = 1, num_rounds: int = 1, **params: Any
) -> Loss:
    """Build loss ``name`` for a client with ``class_counts`` in round ``server_round``.

    Parameters
    ----------
    name : str
        A registered name (:func:`list_losses`) or an import path ``"pkg.mod:factory"``.
    class_counts : array-like of int
        The client's number of samples per class (length C, >= 0, not all zero).
    server_round, num_rounds : int
        1-based current round and total rounds (for DRW schedules).
    **params
        The loss's snake_case parameters (:func:`loss_defaults`). Every built-in loss
        takes ``s``, the scale of the logits (``z = s * ...`` above); None means 1, the
        value for a linear classifier. A cosine classifier's logits lie in [-1, 1] and
        need a large ``s``: the engine passes ``COSINE_SCALE`` for it unless the config
        sets ``s`` (:func:`fedimb.federation.loss_kwargs`).

    Returns
    -------
    Loss
        Callable ``(logits, targets) -> scalar`` with ``.params`` (None for a user loss
        that is not a :class:`LossParams`).

    Raises
    ------
    ValueError
        Unknown name (``RegistryError``) or parameter, out-of-range value, bad counts.
    """
    if not isinstance(name, str):
        raise ValueError(f"loss name must be a string, got {name!r}")
    counts = validate_counts(class_counts)
    rounds = check_rounds(server_round, num_rounds)
    if name in _LOSSES:
        spec = _LOSSES.get(name)
        values = spec.resolve(name, params)
        scale = values.pop("s")
        built = spec.build(counts, rounds, **values)
        scale = 1.0 if scale is None else scale
        return Loss(built if built.s == scale else replace(built, s=scale), name=name)
    factory = _LOSSES.get(name)  # an import path, else RegistryError listing the names
    if not callable(factory):
        raise ValueError(f"loss {name!r} is not callable: {factory!r}")
    kwargs = {"server_round": rounds.server_round, "num_rounds": rounds.num_rounds, **params}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a callable without one: calling it tells
        signature = None
    if signature is not None:
        try:
            signature.bind(counts, **kwargs)
        except TypeError as exc:  # e.g. torch.nn.CrossEntropyLoss, or a (logits, targets) loss
            raise ValueError(
                f"loss {name!r} cannot be called as a loss factory ({exc}): it must be "
                "factory(class_counts, *, server_round, num_rounds, <its parameters>) and return "
                "the client's loss"
            ) from exc
    built = factory(counts, **kwargs)
    if isinstance(built, Loss):
        return built
    if isinstance(built, LossParams):
        return Loss(built, name=name)
    if callable(built):
        return Loss(fn=built, name=name)
    raise ValueError(
        f"loss factory {name!r} returned {type(built).__name__}; expected a Loss, "
        f"a LossParams or a callable (logits, targets) -> Tensor"
    )
