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

Modules: :mod:`~fedimb.losses.family` (the formula), :mod:`~fedimb.losses.params` (counts
to per-class vectors, parameter checks), :mod:`~fedimb.losses.registry` (``LOSSES``,
:func:`make_loss`), and the built-ins in :mod:`~fedimb.losses.reweighting` and
:mod:`~fedimb.losses.margins`. A new loss is one decorated factory in one of those.
"""

from fedimb.losses import margins, reweighting  # noqa: F401  (they register the built-ins)
from fedimb.losses.family import (
    BASES,
    TENSOR_FIELDS,
    Loss,
    LossParams,
    batched_imbalance_loss,
    imbalance_loss,
    imbalance_loss_tensors,
    stack_params,
)
from fedimb.losses.margins import COSINE_HEAD_LOSSES
from fedimb.losses.params import MISSING_POLICIES, PARAM_CHECKS, validate_counts
from fedimb.losses.registry import (
    COSINE_SCALE,
    LOSSES,
    initial_bias,
    list_losses,
    loss_defaults,
    make_loss,
)

__all__ = [
    "BASES",
    "COSINE_HEAD_LOSSES",
    "COSINE_SCALE",
    "LOSSES",
    "MISSING_POLICIES",
    "PARAM_CHECKS",
    "TENSOR_FIELDS",
    "Loss",
    "LossParams",
    "batched_imbalance_loss",
    "imbalance_loss",
    "imbalance_loss_tensors",
    "initial_bias",
    "list_losses",
    "loss_defaults",
    "make_loss",
    "stack_params",
    "validate_counts",
]
