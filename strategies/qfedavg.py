"""q-FedAvg [Li et al., 2020]: Flower's ``QFedAvg`` with the config rule it needs.

Paper: https://arxiv.org/abs/1905.10497
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategy


class QFedAvg(flwr_strategy.QFedAvg):
    """Flower's ``QFedAvg``, and what a run config must know about it."""

    @classmethod
    def check_config(cls, config: Any) -> list[str]:
        """Warnings about ``config`` (a ``fedimb.config.Config``) for this strategy.

        q-FedAvg rescales the updates by its own constant ``client_learning_rate``, so an
        lr schedule that changes the clients' lr makes the two disagree.
        """
        decays = config["lr-schedule.decay"] != 1
        drops = bool(config["lr-schedule.milestones"].strip())
        if decays or drops:
            return [
                f"strategy {config.strategy.name!r} keeps its client-learning-rate while "
                "[lr-schedule] changes the clients' lr"
            ]
        return []
