"""The experiment config: TOML (+ ``--set`` overrides) -> one frozen, validated object.

A config is a TOML file with kebab-case keys, usable as it is as a Flower run config
(``flwr run . --run-config configs/x.toml``): Flower flattens tables into dotted keys
(``loss.name``), and :meth:`Config.from_flat` reads exactly that form back.

It is validated once, before any data is loaded or Ray starts: unknown keys (with a
did-you-mean), wrong types, out-of-range values and unknown component names each give
one :class:`ConfigError` naming the key, the value and what is allowed. What needs the
data (the partition, the model on the data's shape, a plug-in loss on real counts) is
checked by :func:`fedimb.preflight.prepare`, still before any engine starts.

Modules, by job:

- :mod:`~fedimb.config.schema`: every key, its type, default and range.
- :mod:`~fedimb.config.parsing`: TOML, ``--set`` overrides, the flat form.
- :mod:`~fedimb.config.components`: the component tables, plug-in introspection, the
  loss and strategy built to check their parameters.
- :mod:`~fedimb.config.checks`: rules across keys, resume compatibility.
- :mod:`~fedimb.config.build`: :class:`Config` and :func:`load_config`.
"""

from fedimb.config.build import Config, from_nested, load_config
from fedimb.config.checks import (
    EXECUTION_KEYS,
    class_keep_fractions,
    config_changes,
    flat_changes,
)
from fedimb.config.components import (
    Component,
    component_catalog,
    declares,
    in_config_words,
    plugin_params,
    registered_keys,
)
from fedimb.config.parsing import (
    apply_overrides,
    dump_toml,
    flatten,
    parse_id_list,
    parse_overrides,
    parse_value,
    read_toml,
    unflatten,
)
from fedimb.config.schema import (
    COMPONENT_DEFAULTS,
    COMPONENT_OWN_KEYS,
    CONFIGS_DIR,
    DEFAULT_CONFIG,
    ENGINES,
    FIXED_TABLES,
    ON_OFF_AUTO,
    OPTIMIZER_STATES,
    PRECISIONS,
    RUN_WORDS,
    TOP_LEVEL,
    ConfigError,
    Field,
    kebab_to_snake,
    snake_to_kebab,
)
from fedimb.schedule import lr_in_round, lr_milestones

__all__ = [
    "COMPONENT_DEFAULTS",
    "COMPONENT_OWN_KEYS",
    "CONFIGS_DIR",
    "DEFAULT_CONFIG",
    "ENGINES",
    "EXECUTION_KEYS",
    "FIXED_TABLES",
    "ON_OFF_AUTO",
    "OPTIMIZER_STATES",
    "PRECISIONS",
    "RUN_WORDS",
    "TOP_LEVEL",
    "Component",
    "Config",
    "ConfigError",
    "Field",
    "apply_overrides",
    "class_keep_fractions",
    "component_catalog",
    "config_changes",
    "declares",
    "dump_toml",
    "flat_changes",
    "flatten",
    "from_nested",
    "in_config_words",
    "kebab_to_snake",
    "load_config",
    "lr_in_round",
    "lr_milestones",
    "parse_id_list",
    "parse_overrides",
    "parse_value",
    "plugin_params",
    "read_toml",
    "registered_keys",
    "snake_to_kebab",
    "unflatten",
]
