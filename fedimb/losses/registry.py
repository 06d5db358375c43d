"""The loss registry and :func:`make_loss`, which builds a client's loss.

A built-in registers its factory with ``@LOSSES.register("name")``; the factory takes
``(counts, rounds)`` and keyword parameters whose defaults are the loss's defaults, and
returns :class:`~fedimb.losses.family.LossParams`. Every built-in also takes ``s``, the
logit scale, applied here. A name that is an import path is a user's factory.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from fedimb.losses.family import Loss, LossParams
from fedimb.losses.params import PARAM_CHECKS, validate_counts
from fedimb.registry import REQUIRED, Registry, callable_params
from fedimb.schedule import check_rounds

LOSSES: Registry[Callable[..., LossParams]] = Registry("loss")
COSINE_SCALE = 30.0  # s for cosine logits unless set (Cao et al.'s NormedLinear + LDAM)


@functools.cache  # make_loss asks per client and round; a signature does not change
def _builtin_defaults(name: str) -> Mapping[str, Any]:
    """A built-in's parameters and defaults: its factory's keywords, then the scale ``s``."""
    params, _ = callable_params(LOSSES.get(name), skip=2)
    return MappingProxyType({**params, "s": None})


def _resolve(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A built-in's parameters: ``params`` over its defaults, each checked."""
    defaults = _builtin_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "(none)"
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for loss "
            f"{name!r}; valid parameters: {valid}"
        )
    values = {**defaults, **params}
    return {k: PARAM_CHECKS[k](k, v) for k, v in values.items()}


def list_losses() -> list[str]:
    """Names of the built-in losses, sorted."""
    return LOSSES.names()


def loss_defaults(name: str) -> dict[str, Any]:
    """Defaults of the parameters of loss ``name`` (snake_case keys).

    For an import path, the keyword defaults of the user factory (without
    ``server_round`` / ``num_rounds``). Unknown names raise ``RegistryError``.
    """
    if name in LOSSES:
        return dict(_builtin_defaults(name))
    factory = LOSSES.get(name)  # imports a path, or raises listing the valid names
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
    if name in LOSSES:
        values = _resolve(name, params)
        scale = values.pop("s")
        built = LOSSES.get(name)(counts, rounds, **values)
        scale = 1.0 if scale is None else scale
        return Loss(built if built.s == scale else replace(built, s=scale), name=name)
    factory = LOSSES.get(name)  # an import path, else RegistryError listing the names
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
