"""FedDyn [Acar et al., 2021]: federated learning with dynamic regularization.

Paper: https://arxiv.org/abs/2111.04263 (Algorithm 1)

Message protocol:

- train instruction: ``"config"`` carries ``"feddyn-alpha"`` (alpha);
- train reply: FedAvg's; the client keeps its gradient state ``g_i`` (``"feddyn-grad"``
  in its ``context.state``, checkpointed by the server).

Client i minimises ``L_i(w) - <g_i, w> + alpha/2 ||w - w_t||^2`` from the global model
``w_t`` (gradient term ``alpha (w - w_t) - g_i``, :class:`FedDynClient`), then sets
``g_i <- g_i - alpha (w_i - w_t)``. The server keeps ``h`` and, over the participating
set ``P`` out of ``m`` clients::

    h <- h - alpha/m * sum_{i in P} (w_i - w_t)
    w_{t+1} <- mean_{i in P} w_i - h / alpha
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.supercore import log

from fedimb.algorithm import ClientHalf, ClientTerms, HalfReply
from fedimb.records import record_of
from fedimb.train import TrainResult, TrainSettings
from strategies.stock import FedAvg

FEDDYN_ALPHA_KEY = "feddyn-alpha"  # train config entry: alpha
FEDDYN_STATE = "feddyn-grad"  # the client's g_i in its context.state


class FedDynClient(ClientHalf):
    """FedDyn's client: gradient + alpha (w - w_t) - g_i; then g_i's update, kept."""

    keeps_state = True

    def prepare(
        self,
        instruction: RecordDict,
        state: RecordDict,
        global_params: Mapping[str, torch.Tensor],
        settings: TrainSettings,
    ) -> ClientTerms | None:
        """alpha from the train config and g_i from the state (zero in a first round)."""
        alpha = instruction["config"].get(FEDDYN_ALPHA_KEY)
        if alpha is None:
            return None
        kept = record_of(state, FEDDYN_STATE, ArrayRecord)
        if kept is None:
            g = {k: torch.zeros_like(v) for k, v in global_params.items()}
        else:
            device = next(iter(global_params.values())).device
            g = {k: v.to(device) for k, v in kept.to_torch_state_dict().items()}
        return ClientTerms(self, {"alpha": float(alpha), "g": g})

    def gradient(
        self, param: torch.Tensor, global_param: torch.Tensor, inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """alpha (w - w_t) - g_i."""
        return inputs["alpha"] * (param - global_param) - inputs["g"]

    def finish(
        self,
        terms: ClientTerms,
        global_params: Mapping[str, torch.Tensor],
        result: TrainResult,
        settings: TrainSettings,
        state: RecordDict,
    ) -> HalfReply:
        """g_i <- g_i - alpha (w_i - w_t), kept in the client's state."""
        alpha, g = terms.grad["alpha"], terms.grad["g"]
        new_g = {k: g[k] - alpha * (result.state[k].to(g[k].device) - global_params[k]) for k in g}
        state[FEDDYN_STATE] = ArrayRecord({k: v.cpu() for k, v in new_g.items()})
        return HalfReply()


class FedDyn(FedAvg):
    """FedDyn's server: the uniform mean of the clients' models, corrected by ``h``.

    The parameters take the paper's uniform mean; other arrays (integer buffers,
    BatchNorm statistics) take FedAvg's ``num-examples``-weighted mean. ``m`` is the
    number of nodes the grid reports in ``configure_train``.

    Parameters
    ----------
    alpha : float (default: 0.01)
        The regularisation strength, > 0.
    param_keys : list[str], optional
        Keys of the trainable parameters; fedimb's server passes the model's. If None,
        every floating-point array of the global model.
    **kwargs
        Forwarded to ``FedAvg``.

    Attributes
    ----------
    h : dict[str, np.ndarray] or None
        The server state ``h`` (float64); part of the strategy's pickled state.
    """

    client_half = FedDynClient()

    def __init__(
        self, *, alpha: float = 0.01, param_keys: list[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.param_keys = list(param_keys) if param_keys is not None else None
        self.h: dict[str, np.ndarray] | None = None
        self.current_arrays: dict[str, np.ndarray] | None = None
        self.num_total_nodes: int | None = None

    def summary(self) -> None:
        """Log the FedDyn settings, then FedAvg's."""
        log(INFO, "\t├──> FedDyn settings:")
        log(INFO, "\t│\t└── alpha: %s", self.alpha)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``w_t`` and ``m``, and send alpha in the train config."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        if self.h is None:
            keys = self.param_keys or [
                k for k, v in self.current_arrays.items() if np.issubdtype(v.dtype, np.floating)
            ]
            self.h = {k: np.zeros(self.current_arrays[k].shape) for k in keys}
        self.num_total_nodes = len(list(grid.get_node_ids()))
        config[FEDDYN_ALPHA_KEY] = self.alpha
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg (validation, metrics, buffers), then ``h`` and the corrected mean."""
        replies = list(replies)
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None:
            return averaged, metrics
        if self.current_arrays is None or self.h is None:
            raise AggregationError(
                "FedDyn has no global model; call configure_train before aggregate_train."
            )
        models = [
            next(iter(msg.content.array_records.values())) for msg in replies if not msg.has_error()
        ]
        m = max(self.num_total_nodes or 0, len(models))
        out = dict(averaged.items())
        for key, h in self.h.items():
            w = self.current_arrays[key].astype(np.float64)
            local = [model[key].numpy().astype(np.float64) for model in models]
            h -= self.alpha / m * sum(w_i - w for w_i in local)
            new = np.mean(local, axis=0) - h / self.alpha
            out[key] = Array(np.asarray(new.astype(self.current_arrays[key].dtype)))
        return ArrayRecord(out), metrics
