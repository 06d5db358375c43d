"""FedProx [Li et al., 2020]: FedAvg whose clients add a proximal term.

Paper: https://arxiv.org/abs/1812.06127

Message protocol: Flower's ``FedProx.configure_train`` puts ``"proximal-mu"`` (mu) in
the train config; each client then minimises ``L_i(w) + mu/2 ||w - w_global||^2``, so
:class:`ProximalClient` adds ``mu * (w - w_global)`` to every gradient. The reply is
FedAvg's. The half is attached to Flower's own class too, so
``"flwr.serverapp.strategy:FedProx"`` trains the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import RecordDict
from flwr.serverapp import strategy as flwr_strategy

from fedimb.algorithm import ClientHalf, ClientTerms, attach_client_half
from fedimb.train import TrainSettings
from strategies.stock import FedAvg

PROXIMAL_MU_KEY = "proximal-mu"  # train config entry, set by Flower's FedProx


class ProximalClient(ClientHalf):
    """FedProx's client: gradient + mu * (w - w_global)."""

    def prepare(
        self,
        instruction: RecordDict,
        state: RecordDict,
        global_params: Mapping[str, torch.Tensor],
        settings: TrainSettings,
    ) -> ClientTerms | None:
        """mu from the train config (None for mu = 0: plain SGD, without the term's work)."""
        mu = float(instruction["config"].get(PROXIMAL_MU_KEY, 0.0))
        return ClientTerms(self, {"mu": mu}) if mu else None

    def gradient(
        self, param: torch.Tensor, global_param: torch.Tensor, inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """mu * (w - w_global)."""
        return inputs["mu"] * (param - global_param)


PROXIMAL = ProximalClient()
attach_client_half(flwr_strategy.FedProx, PROXIMAL)


class FedProx(flwr_strategy.FedProx, FedAvg):
    """Flower's ``FedProx`` with :class:`~strategies.stock.FedAvg`'s array mean (its
    client half, :class:`ProximalClient`, comes with Flower's class)."""
