"""The one parametric loss family every built-in loss belongs to.

A member is :class:`LossParams` (per-class tensors and three scalars) and is computed
by one pure function, :func:`imbalance_loss_tensors`, so an engine can train many
clients at once with :func:`torch.func.vmap`, each with its own loss tensors
(:func:`stack_params`). The formula is in :mod:`fedimb.losses`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

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
