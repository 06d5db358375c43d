"""Engines: what runs a round's clients for fedimb's server (see :mod:`.base`).

- ``ray``: Flower's simulation engine on Ray (:mod:`.ray`);
- ``inprocess``: a Flower Grid in this process, no Ray (:mod:`.inprocess`).

Importing this package registers every engine without importing torch or Flower.
"""

import importlib

from fedimb.engines.base import ENGINES, Engine, engine_names, get_engine, register_engine

# Each registers itself, in this order (the default first: the config's error lists it so).
ENGINE_MODULES = ("ray", "inprocess")
for _module in ENGINE_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ENGINES", "ENGINE_MODULES", "Engine", "engine_names", "get_engine", "register_engine"]
