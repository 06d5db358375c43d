"""The ``inprocess`` engine: fedimb's server drives an :class:`InProcessGrid` in this
process, no SuperLink and no Ray; a round's clients are trained together on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedimb.engines.base import Engine, register_engine

if TYPE_CHECKING:
    from fedimb.config import Config


@register_engine("inprocess")
class InProcessEngine(Engine):
    """A Flower Grid in this process (no Ray); same server, strategy and client code."""

    @staticmethod
    def run(config: Config, out_dir: Path, *, verbose: bool, **kwargs: Any) -> dict[str, Any]:
        from clients.app import app as client_app
        from fedimb import batched
        from fedimb.client import model_for
        from fedimb.engines.inprocess_grid import InProcessGrid, frozen_start_up, task_identity
        from fedimb.federation import get_federation
        from fedimb.server import run_server

        del verbose  # nothing of Flower's or Ray's to show
        fed = get_federation(config)
        vectorised = batched.wanted(config["batched"], model_for(config, fed), fed.device)
        grid = InProcessGrid(client_app, config["num-clients"], batched=config["batched"] != "off")
        with task_identity(grid.run.run_id), frozen_start_up(vectorised=vectorised):
            return run_server(grid, config, out_dir, **kwargs)
