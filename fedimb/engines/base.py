"""The engine registry and what an engine does.

An engine carries a round's messages between fedimb's server and the clients. The
config's ``engine`` choices, the CLI's ``--engine`` and the launcher
(:func:`fedimb.sim.run_experiment`) all read :data:`ENGINES`, so an engine is added in
``fedimb/engines/`` alone: a module with an ``@register_engine(name)`` class, imported
by ``fedimb/engines/__init__.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedimb.registry import Registry

if TYPE_CHECKING:
    from fedimb.config import Config


class Engine:
    """One way to run fedimb's server and clients; its docstring's first line is its
    description (``fedimb list``).

    Engine modules import torch, Flower and Ray inside these methods: the config reads
    the engines' names when it is imported, before any of them is needed.
    """

    @staticmethod
    def check(config: Config) -> None:
        """Fail with a ConfigError on what this engine cannot run, before the data loads."""

    @staticmethod
    def run(config: Config, out_dir: Path, *, verbose: bool, **kwargs: Any) -> dict[str, Any]:
        """Run the validated ``config`` into ``out_dir`` and return its summary.

        ``kwargs`` are :func:`fedimb.server.run_server`'s (resume, progress, on_round,
        label); ``verbose`` shows the engine's own logs.
        """
        raise NotImplementedError


ENGINES: Registry[type[Engine]] = Registry("engine")
register_engine = ENGINES.register


def engine_names() -> tuple[str, ...]:
    """The engines' names in registration order (the default, ``ray``, first)."""
    return tuple(ENGINES)


def get_engine(name: str) -> type[Engine]:
    """The engine registered as ``name``; an unknown name lists the valid ones."""
    return ENGINES.get(name)
