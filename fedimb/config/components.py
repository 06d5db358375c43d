"""The component tables (``[loss]``, ``[strategy]``, ``[partition]``, ``[model]``,
``[sampling]``): a ``name`` plus parameters checked against the named component.

The catalogue of each table's registered components, a plug-in's parameters read from
its signature, and the loss and strategy built once to let them check their own
parameters. A table may carry parameters of several components (a sweep over
``loss.name`` shares one ``[loss]`` table): each receives those it accepts; a key that no
component accepts is an error. A ``name`` that is an import path (``"pkg.mod:obj"``)
takes its keyword parameters the same way, checked against their defaults' types (one
with ``**kwargs`` receives every key of its table and checks them itself). Parameter
ranges the components do not check themselves sit beside them
(:data:`strategies.param_ranges.PARAM_RANGES` for the strategies).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fedimb.config.schema import (
    _TYPE_WORDS,
    COMPONENT_DEFAULTS,
    COMPONENT_OWN_KEYS,
    FIXED_TABLES,
    RUN_WORDS,
    ConfigError,
    _did_you_mean,
    _positive,
    kebab_to_snake,
    snake_to_kebab,
)
from fedimb.registry import (
    REQUIRED,
    RegistryError,
    callable_params,
    import_object,
    is_import_path,
)

if TYPE_CHECKING:
    from fedimb.config.build import Config

Rule = tuple[Callable[[Any], bool], str]

# Ranges of the built-in models' parameters (their factories take any integer).
MODEL_PARAM_RANGES: dict[str, Rule] = {
    "hidden": (_positive, "an integer >= 1"),
    "width": (_positive, "an integer >= 1"),
}


def param_ranges(table: str) -> Mapping[str, Rule]:
    """``parameter -> (rule, what is allowed)`` for the parameters of component ``table``
    that the components do not check themselves (Flower's strategies take any number)."""
    if table == "strategy":
        from strategies.param_ranges import PARAM_RANGES

        return PARAM_RANGES
    return MODEL_PARAM_RANGES if table == "model" else {}


@dataclasses.dataclass(frozen=True)
class Component:
    """A named, parameterised piece of the run (a loss, a strategy, ...).

    ``params`` holds only the parameters this component accepts, with kebab-case keys;
    ``ignored``, the keys of its table that only other components take.
    """

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ignored: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)

    def kwargs(self) -> dict[str, Any]:
        """The parameters as snake_case keyword arguments for the component's factory."""
        return {kebab_to_snake(k): v for k, v in self.params.items()}

    def in_config_words(self, table: str, text: str) -> str:
        """``text`` with this component's parameter names (and the run-level ``RUN_WORDS``)
        spelt as config keys: ``drs-start``, not ``drs_start``."""
        try:
            names = set(component_catalog(table)[1](self.name))
        except Exception:  # a plug-in that cannot be inspected: the given names only
            names = set()
        return in_config_words(text, names | set(self.kwargs()))


def in_config_words(text: str, names: Iterable[str] = ()) -> str:
    """``text`` with ``names`` and the run-level ``RUN_WORDS`` spelt as config keys."""
    for snake in sorted({*names, *RUN_WORDS}, key=len, reverse=True):  # longest first
        text = re.sub(rf"\b{re.escape(snake)}\b", snake_to_kebab(snake), text)
    return text


def tables_with_key(key: str) -> list[str]:
    """``table.key`` for each table where ``key`` is a field or a component's parameter."""
    found = [f"{t}.{key}" for t, fields in FIXED_TABLES.items() if key in fields]
    for table in COMPONENT_DEFAULTS:
        if key in registered_keys(table) or key in COMPONENT_OWN_KEYS.get(table, {}):
            found.append(f"{table}.{key}")
    return found


@functools.cache  # the registries are filled at import; every config load asks
def registered_keys(table: str) -> frozenset[str]:
    """The config keys (kebab-case) that some registered component of ``table`` takes."""
    names, defaults_of = component_catalog(table)
    return frozenset(snake_to_kebab(k) for n in names for k in defaults_of(n))


def component_catalog(table: str) -> tuple[list[str], Callable[[str], dict[str, Any]]]:
    """Registered names and a ``name -> {param: default}`` function for a component table.

    Imported lazily so that reading a config does not import torch until it is validated.
    """
    if table == "loss":
        from fedimb import losses

        return losses.list_losses(), losses.loss_defaults
    if table == "sampling":
        from fedimb import sampling

        return sampling.list_samplers(), sampling.sampler_params
    if table == "partition":
        from fedimb.data.partition import PARTITIONERS, partition_params

        return PARTITIONERS.names(), partition_params
    if table == "model":
        from fedimb import models

        return models.list_models(), models.model_params
    if table == "strategy":
        import strategies

        return strategies.list_strategies(), strategies.strategy_params
    raise KeyError(table)


# What fedimb itself passes to a plug-in of each table, not config keys: how many leading
# positional arguments (the counts, the data shape, the labels ...) and which keywords.
_SUPPLIED: dict[str, tuple[int, frozenset[str]]] = {
    "loss": (1, frozenset({"server_round", "num_rounds"})),
    "sampling": (2, frozenset({"server_round", "num_rounds"})),
    "model": (2, frozenset({"vocab_size"})),
    "partition": (3, frozenset()),
}


@functools.cache  # a plug-in's signature does not change within a process
def plugin_params(table: str, name: str) -> tuple[dict[str, Any], bool]:
    """A plug-in's config parameters (kebab-case) with their defaults (``REQUIRED``: none),
    and whether it takes ``**kwargs`` (then it receives every key of its table and checks
    them itself). A strategy's follow ``**kwargs`` up to the Flower class it extends."""
    if table == "strategy":
        import strategies

        params, open_ended = strategies.strategy_signature(name)
        return {snake_to_kebab(k): v for k, v in params.items()}, open_ended
    obj = import_object(name)
    skip, supplied = _SUPPLIED[table]
    try:
        params, var_kw = callable_params(obj, skip)
    except (TypeError, ValueError):  # not introspectable: it checks its own
        return {}, True
    return {snake_to_kebab(k): v for k, v in params.items() if k not in supplied}, var_kw


@functools.cache  # called per client and round (fedimb.federation.loss_kwargs)
def declares(table: str, name: str, key: str) -> bool:
    """Whether component ``name`` of ``table`` takes parameter ``key`` (kebab-case): every
    built-in model takes ``cosine-head`` and every built-in loss ``s``; a plug-in, if its
    signature names it or has ``**kwargs``."""
    if not is_import_path(name):
        return key in {snake_to_kebab(k) for k in component_catalog(table)[1](name)}
    try:
        params, var_kw = plugin_params(table, name)
    except RegistryError:
        return False
    return var_kw or key in params


def _declared(table: str, name: str) -> set[str] | None:
    """A plug-in's declared parameters; None (any key) for ``**kwargs``, or for a path that
    does not import (its own cell says so: the others need not guess)."""
    try:
        params, var_kw = plugin_params(table, name)
    except RegistryError:
        return None
    return None if var_kw else set(params)


def build_component(table: str, body: Mapping[str, Any], plugins: Iterable[str] = ()) -> Component:
    body = dict(body)
    name = body.pop("name", COMPONENT_DEFAULTS[table])
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{table}.name = {name!r}: expected a non-empty string")
    names, defaults_of = component_catalog(table)
    others = [p for p in plugins if p != name]
    anyone = set(registered_keys(table))
    declared = [_declared(table, p) for p in others]
    anything = None in declared  # a plug-in with **kwargs: another cell's key may be its
    anyone |= set().union(*(d for d in declared if d is not None))
    if is_import_path(name):
        try:  # import it now, so that a bad path fails before anything runs
            defaults, var_kw = plugin_params(table, name)
        except RegistryError as exc:
            raise ConfigError(f"{table}.name = {name!r}: {exc}") from exc
        if var_kw:  # it receives every key and checks them itself
            return Component(name, MappingProxyType(body))
        plugin = True
    elif name in names:
        defaults = {snake_to_kebab(k): v for k, v in defaults_of(name).items()}
        plugin = False
    else:
        raise ConfigError(
            f"{table}.name = {name!r}: unknown {table} {name!r}{_did_you_mean(name, names)}; "
            f"valid: {', '.join(names)}, or an import path 'package.module:attribute'"
        )
    for key in body:
        if key not in defaults and key not in anyone and not anything:
            raise ConfigError(
                f"unknown config key '{table}.{key}'{_did_you_mean(key, set(defaults) | anyone)}; "
                f"{table} {name!r} accepts: {', '.join(sorted(defaults)) or '(no parameters)'}"
            )
    missing = [k for k, v in defaults.items() if v is REQUIRED and k not in body]
    if missing and plugin and table != "strategy":  # a strategy names its own
        raise ConfigError(
            f"{table}.{missing[0]} is required: {table} {name!r} has no default for it"
        )
    checked = {
        k: _check_param(table, k, v, defaults[k], plugin=plugin)
        for k, v in body.items()
        if k in defaults
    }
    return Component(name, MappingProxyType(checked), frozenset(body) - set(defaults))


def _check_param(table: str, key: str, value: Any, default: Any, *, plugin: bool = False) -> Any:
    """A component's parameter, of its default's type and in its range.

    The built-in losses check their own parameters (``min-count`` is a float with
    default 1); a parameter without a default, or with None, takes any value.
    """
    where = f"{table}.{key} = {value!r}"
    if (table == "loss" and not plugin) or default is None or default is REQUIRED:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected {_TYPE_WORDS[bool]} (without quotes)")
    elif isinstance(default, int | float):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = _TYPE_WORDS[int if isinstance(default, int) else float]
            raise ConfigError(f"{where}: expected {kind}")
        if isinstance(default, int):
            if not whole:
                raise ConfigError(f"{where}: expected {_TYPE_WORDS[int]}")
            value = int(value)
        # else an int stays an int where a float is the default (drs-start 5 is a round)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected {_TYPE_WORDS[str]}")
    rule = param_ranges(table).get(key)
    if rule is not None and not rule[0](value):
        raise ConfigError(f"{where}: must be {rule[1]}")
    return value


def check_component_params(config: Config) -> None:
    """Let the loss and the strategy check their own parameters by building them.

    (The partition, dataset and model are checked with the data, before any engine
    starts: :func:`fedimb.preflight.prepare`.)
    """
    import strategies
    from fedimb import losses

    loss, strategy = config.loss, config.strategy
    given = strategy.params.get("momentum", config["momentum"])
    if given != config["momentum"] and strategies.follows_client_momentum(strategy.name):
        raise ConfigError(
            f"strategy.momentum = {given!r}, but the clients train with momentum = "
            f"{config['momentum']!r}: FedNova normalises by the clients' momentum, which "
            "it takes from momentum; drop strategy.momentum"
        )
    try:  # a plug-in is built on real counts, with the data (fedimb.preflight.prepare)
        if not is_import_path(loss.name):
            losses.make_loss(
                loss.name,
                [10] * 3,
                server_round=1,
                num_rounds=config["num-rounds"],
                **loss.kwargs(),
            )
    except (ValueError, TypeError, RegistryError) as exc:
        raise config.component_error("loss", exc) from exc
    kwargs = config.strategy_kwargs()
    try:
        built = strategies.make_strategy(strategy.name, **kwargs)
    except (ValueError, TypeError, RegistryError) as exc:
        raise config.component_error("strategy", exc) from exc
    except Exception as exc:  # a plug-in's own error in its __init__
        if not config.raised_by("strategy", exc):
            raise
        raise config.component_error("strategy", exc) from exc
    try:  # every checkpoint pickles it: fail now, not after the rounds before the first
        if config["checkpoint-every"] > 0:
            pickle.dumps(built)
    except Exception as exc:
        raise ConfigError(
            f"[strategy] {strategy.name} cannot be pickled, which every checkpoint does "
            f"({type(exc).__name__}: {exc}); keep its state in picklable attributes (no "
            "lambdas, local functions, open files or locks)"
        ) from exc
    _check_node_minimums(config, built)
    _check_sampling_applies(config, built, kwargs)


def _check_sampling_applies(config: Config, strategy: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a client sampling the strategy will not do: a plug-in that does not pass
    ``fraction_train`` / ``min_train_nodes`` on to Flower's class keeps its own. Only a
    value the config changes from its default is checked: a plug-in may fix its own.
    ``kwargs``: what the strategy was built with (``strategy_kwargs``)."""
    fields = COMPONENT_OWN_KEYS["strategy"]
    for attr, key in (
        ("fraction_train", "fraction-train"),
        ("min_train_nodes", "min-train-clients"),
    ):
        own, wanted = getattr(strategy, attr, None), kwargs[attr]
        if (
            own is not None
            and own != wanted
            and config.strategy_options[key] != fields[key].default
        ):
            raise ConfigError(
                f"[strategy] {config.strategy.name}: strategy.{key} = {wanted} cannot apply, "
                f"the strategy keeps {attr} = {own}; pass {attr} on to Flower's class in its "
                f"__init__ (or drop strategy.{key})"
            )


def _check_node_minimums(config: Config, strategy: Any) -> None:
    """Flower waits forever for more nodes than the federation has: check the minimums
    the strategy will use (defaults included; evaluation's only when it evaluates)."""
    wanted = ["min_train_nodes", "min_available_nodes"]
    if getattr(strategy, "fraction_evaluate", 0):
        wanted.append("min_evaluate_nodes")
    for attr in wanted:
        value = getattr(strategy, attr, None)
        if value is None:
            continue
        name = snake_to_kebab(attr)
        given = name in config.strategy.params
        if not given and attr != "min_evaluate_nodes":
            name, given = "min-train-clients", True  # fedimb's own key sets both
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"strategy.{name} = {value!r}: expected an integer")
        if value > config["num-clients"]:
            raise ConfigError(
                f"strategy.{name} = {value}: must be <= num-clients ({config['num-clients']})"
                + ("" if given else " (the strategy's default)")
            )
