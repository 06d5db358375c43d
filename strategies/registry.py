"""Strategy registry: a name or an import path -> a configured Flower ``Strategy``.

``make_strategy("fedprox", proximal_mu=0.01)`` builds a registered class;
``make_strategy("mypkg.mymod:MyStrategy", my_param=3)`` imports a user's class, which
must subclass ``flwr.serverapp.strategy.Strategy``. Parameters are the class's own
constructor keyword arguments; unknown ones are rejected with the accepted list.

``fedavg``, ``fedprox``, ``fedavgm``, ``fedadagrad``, ``fedadam`` and ``fedyogi`` are
Flower's classes with one step swapped in: the weighted mean of the replies' arrays, done
by torch and equal to Flower's bit for bit (``strategies.stock``). Flower's originals
are reachable by import path (``"flwr.serverapp.strategy:FedAvg"``).

Defaults this tool applies on top of a class's own (only where the class accepts them):

- ``fraction_evaluate=0.0``: the global model is evaluated on the server's balanced
  test set; federated evaluation is opt-in (``fraction_evaluate > 0``);
- ``train_metrics_aggr_fn=aggregate_train_metrics`` and
  ``evaluate_metrics_aggr_fn=aggregate_class_counts`` (see ``strategies.aggregation``);
- ``train_loss_key="train-loss"`` (q-FedAvg), the key our ClientApp reports.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, Strategy

from fedimb.registry import REQUIRED, Registry, RegistryError
from strategies.aggregation import aggregate_class_counts, aggregate_train_metrics
from strategies.fedaws import FedAwS
from strategies.feddyn import FedDyn
from strategies.fednova import FedNova
from strategies.fedprox import FedProx
from strategies.qfedavg import QFedAvg
from strategies.scaffold import Scaffold
from strategies.stock import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
# The decorator, applied here: Flower's classes are not ours to decorate, and one list
# shows every strategy a name reaches.
STRATEGIES.register("fedavg")(FedAvg)
STRATEGIES.register("fedavgm")(FedAvgM)
STRATEGIES.register("fedprox")(FedProx)
STRATEGIES.register("fedadagrad")(FedAdagrad)
STRATEGIES.register("fedadam")(FedAdam)
STRATEGIES.register("fedyogi")(FedYogi)
STRATEGIES.register("fedmedian")(FedMedian)
STRATEGIES.register("fedtrimmedavg")(FedTrimmedAvg)
STRATEGIES.register("krum")(Krum)
STRATEGIES.register("qfedavg")(QFedAvg)
STRATEGIES.register("scaffold")(Scaffold)
STRATEGIES.register("fednova")(FedNova)
STRATEGIES.register("fedaws")(FedAwS)
STRATEGIES.register("feddyn")(FedDyn)

# Our defaults, overriding the class's where it has the parameter (see module doc).
_TOOL_DEFAULTS: dict[str, Any] = {"fraction_evaluate": 0.0, "train_loss_key": "train-loss"}
# Wired by make_strategy, not by config files (a TOML value cannot be a function).
_INTERNAL: dict[str, Any] = {
    "train_metrics_aggr_fn": aggregate_train_metrics,
    "evaluate_metrics_aggr_fn": aggregate_class_counts,
}


# Settings (Flower's defaults) under which a registered strategy trains exactly as FedAvg.
_FEDAVG_SETTINGS: dict[str, dict[str, float]] = {
    "fedprox": {"proximal_mu": 0.0},
    "fedavgm": {"server_momentum": 0.0, "server_learning_rate": 1.0},
}


def trains_as_fedavg(name: str, params: dict[str, Any]) -> tuple[str, float] | None:
    """The parameter and its value that make strategy ``name`` train exactly as FedAvg
    (``("proximal_mu", 0.0)`` for FedProx at Flower's default), or None."""
    settings = _FEDAVG_SETTINGS.get(name, {})
    if settings and all(params.get(k, v) == v for k, v in settings.items()):
        return next(iter(settings.items()))
    return None


def follows_client_momentum(name: str) -> bool:
    """Whether strategy ``name`` takes the clients' SGD momentum (FedNova and its
    subclasses normalise by it), which the run config's ``momentum`` then supplies."""
    try:
        return issubclass(resolve_strategy(name), FedNova)
    except RegistryError:
        return False


def list_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return STRATEGIES.names()


def resolve_strategy(name: str) -> type[Strategy]:
    """Return the strategy class for a registered name or ``"pkg.mod:Class"`` path.

    Raises
    ------
    RegistryError
        (a ``ValueError``) for an unknown name, a bad import path, or an object that is
        not a subclass of ``flwr.serverapp.strategy.Strategy``.
    """
    obj = STRATEGIES.get(name)
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise RegistryError(
            f"strategy {name!r} resolves to {obj!r}, which is not a subclass of "
            f"flwr.serverapp.strategy.Strategy"
        )
    return obj


def _constructor_params(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """Keyword parameters ``cls(...)`` accepts, following ``**kwargs`` up the MRO.

    A subclass that forwards ``**kwargs`` to its parent accepts the parent's
    parameters too. Returns the parameters and whether the chain ends open-ended (an
    ``**kwargs`` that reaches no explicit signature, so any name may be valid).
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object:
            return params, False
        if "__init__" not in vars(klass):
            continue
        forwards = False
        for param in list(inspect.signature(klass.__init__).parameters.values())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                params.setdefault(param.name, param)  # the subclass's default wins
        if not forwards:
            return params, False
    return params, True


def strategy_params(name: str) -> dict[str, Any]:
    """User-settable constructor parameters of a strategy and their effective defaults.

    Parameters
    ----------
    name : str
        Registered name or import path.

    Returns
    -------
    dict
        snake_case parameter name -> the default ``make_strategy`` would use (this
        tool's defaults applied; ``REQUIRED`` for a parameter without one). The metric
        aggregation callables are wired internally and not listed.
    """
    return strategy_signature(name)[0]


def strategy_signature(name: str) -> tuple[dict[str, Any], bool]:
    """:func:`strategy_params`, and whether the class takes any keyword (a ``**kwargs``
    that reaches no explicit signature)."""
    params, open_ended = _constructor_params(resolve_strategy(name))
    defaults = {
        key: _TOOL_DEFAULTS.get(key, param.default)
        for key, param in params.items()
        if key not in _INTERNAL
    }
    return defaults, open_ended


def _normalise_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Config keys are kebab-case (``server-lr``); Python parameters are snake_case."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        snake = key.replace("-", "_")
        if snake in out:
            raise ValueError(f"strategy parameter {snake!r} is given twice ({key!r})")
        out[snake] = value
    return out


def make_strategy(
    name: str,
    *,
    fraction_train: float = 1.0,
    min_train_nodes: int = 2,
    min_available_nodes: int = 2,
    **params: Any,
) -> Strategy:
    """Build a strategy by registered name or ``"pkg.module:Class"`` import path.

    Parameters
    ----------
    name : str
        One of ``list_strategies()`` or an import path to a ``Strategy`` subclass.
    fraction_train, min_train_nodes, min_available_nodes
        Client sampling, passed where the class accepts them.
    **params
        The class's constructor arguments (snake_case; kebab-case keys from a config
        are converted). They override this tool's defaults (module doc).

    Returns
    -------
    Strategy

    Raises
    ------
    ValueError
        For an unknown name or bad import path (``RegistryError``), a class that is not
        a ``Strategy``, an unknown or missing parameter, or a value the class rejects.
    """
    cls = resolve_strategy(name)
    accepted, open_ended = _constructor_params(cls)
    user = _normalise_keys(params)
    unknown = [key for key in user if key not in accepted]
    if unknown and not open_ended:
        raise ValueError(
            f"unknown parameter {unknown[0]!r} for strategy {name!r}; accepted: "
            f"{', '.join(sorted(k for k in accepted if k not in _INTERNAL))}"
        )
    defaults = {
        "fraction_train": fraction_train,
        "min_train_nodes": min_train_nodes,
        "min_available_nodes": min_available_nodes,
        **_TOOL_DEFAULTS,
        **_INTERNAL,
    }
    kwargs = {key: value for key, value in defaults.items() if key in accepted}
    kwargs.update(user)
    missing = [k for k, p in accepted.items() if p.default is REQUIRED and k not in kwargs]
    if missing:
        keys = ", ".join(f"strategy.{k.replace('_', '-')}" for k in missing)
        raise ValueError(f"strategy {name!r} requires {keys} (no default)")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a plug-in that chokes on a value: name the user's keys only
        given = ", ".join(f"strategy.{k.replace('_', '-')}" for k in sorted(user)) or "none"
        raise ValueError(f"cannot build strategy {name!r} (keys given: {given}): {exc}") from exc
