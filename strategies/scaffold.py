"""SCAFFOLD [Karimireddy et al., 2020] strategy, option II control variates.

Paper: https://arxiv.org/abs/1910.06378

Message protocol (the client side: :class:`ScaffoldClient`, below):

- train instruction: ``"arrays"`` (global state_dict), ``"config"`` and
  ``"scaffold-control"``: an ArrayRecord with the global control variate ``c``, one
  array per trainable parameter;
- train reply: ``"arrays"`` (the client's model ``y_i``), ``"metrics"`` and
  ``"scaffold-delta"``: an ArrayRecord with ``c_i_new - c_i`` (same keys as ``c``).

The client keeps its own ``c_i``, trains with ``grad + c - c_i`` and, with option II,
sets ``c_i_new = c_i - c + (x - y_i) / (K * lr)``; with heavy-ball momentum, ``K`` is
the effective step count ``a_i`` (``fedimb.train.effective_steps``, as FedNova's).
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
from fedimb.train import TrainResult, TrainSettings, effective_steps
from strategies.stock import FedAvg

SCAFFOLD_CONTROL_KEY = "scaffold-control"  # instruction: the global control variate c
SCAFFOLD_DELTA_KEY = "scaffold-delta"  # reply: c_i_new - c_i
SCAFFOLD_STATE = "scaffold-ci"  # the client's c_i in its context.state


class ScaffoldClient(ClientHalf):
    """SCAFFOLD's client: gradient + (c - c_i); then option II's new c_i and its delta."""

    keeps_state = True

    def prepare(
        self,
        instruction: RecordDict,
        state: RecordDict,
        global_params: Mapping[str, torch.Tensor],
        settings: TrainSettings,
    ) -> ClientTerms | None:
        """(c, c_i) when the server sent c (c_i = 0 in a client's first round)."""
        control = record_of(instruction, SCAFFOLD_CONTROL_KEY, ArrayRecord)
        if control is None:
            return None
        device = next(iter(global_params.values())).device
        c = {k: v.to(device) for k, v in control.to_torch_state_dict().items()}
        kept = record_of(state, SCAFFOLD_STATE, ArrayRecord)
        if kept is not None:
            c_i = {k: v.to(device) for k, v in kept.to_torch_state_dict().items()}
        else:
            c_i = {k: torch.zeros_like(c[k]) for k in global_params}
        correction = {k: c[k] - c_i[k] for k in global_params}
        return ClientTerms(self, {"correction": correction}, keep=(c, c_i))

    def gradient(
        self, param: torch.Tensor, global_param: torch.Tensor, inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """c - c_i."""
        return inputs["correction"]

    def finish(
        self,
        terms: ClientTerms,
        global_params: Mapping[str, torch.Tensor],
        result: TrainResult,
        settings: TrainSettings,
        state: RecordDict,
    ) -> HalfReply:
        """c_i+ = c_i - c + (x - y_i) / (a_i * lr), kept; the reply carries c_i+ - c_i.

        Option II of Karimireddy et al. divides by K plain SGD steps; heavy-ball momentum
        moves the weights by lr * a_i gradients (a_i: the effective steps), so dividing
        by K would overstate c_i.
        """
        c, c_i = terms.keep
        moved = effective_steps(max(result.num_steps, 1), settings.momentum) * settings.lr
        # result.state may be on the host (the vectorised trainer copies it there).
        new_ci = {
            k: c_i[k] - c[k] + (global_params[k] - result.state[k].to(c[k].device)) / moved
            for k in c_i  # the model's parameters
        }
        state[SCAFFOLD_STATE] = ArrayRecord({k: v.cpu() for k, v in new_ci.items()})
        delta = ArrayRecord({k: (new_ci[k] - c_i[k]).cpu() for k in c_i})
        return HalfReply(records={SCAFFOLD_DELTA_KEY: delta})


class Scaffold(FedAvg):
    """SCAFFOLD: FedAvg with server and client control variates.

    Server update for the sampled set ``S`` out of ``N`` connected nodes::

        x <- x + server_learning_rate * (sum_i p_i y_i - x),   p_i = n_i / sum_j n_j
        c <- c + (|S| / N) * mean_i (c_i_new - c_i)

    The model step weights clients by ``num-examples`` (as FedAvg does, and as the
    rest of this tool does) rather than the paper's uniform mean; with equal-sized
    clients the two coincide. The control variate update is the paper's uniform mean.
    ``N`` is the number of nodes the grid reports in ``configure_train``.

    Parameters
    ----------
    server_learning_rate : float (default: 1.0)
        Global step size ``eta_g``; 1.0 is the paper's default.
    param_keys : list[str], optional
        Keys of the trainable parameters (``[k for k, _ in model.named_parameters()]``)
        that carry a control variate; fedimb's server passes the model's (its clients
        send a delta for parameters only). If None, every floating-point array of the
        first ArrayRecord seen is used, float buffers such as BatchNorm running
        statistics included, and every reply must then hold a delta for each.
    **kwargs
        Forwarded to ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).

    Attributes
    ----------
    control : dict[str, np.ndarray] or None
        The global control variate ``c``; part of the strategy's pickled state.
    """

    client_half = ScaffoldClient()

    def __init__(
        self,
        *,
        server_learning_rate: float = 1.0,
        param_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate!r}")
        self.server_learning_rate = float(server_learning_rate)
        self.param_keys = list(param_keys) if param_keys is not None else None
        self.control: dict[str, np.ndarray] | None = None
        self.current_arrays: dict[str, np.ndarray] | None = None
        self.num_total_nodes: int | None = None

    def summary(self) -> None:
        """Log the SCAFFOLD settings, then FedAvg's."""
        log(INFO, "\t├──> SCAFFOLD settings:")
        log(INFO, "\t│\t├── Server learning rate: %s", self.server_learning_rate)
        keys = "all float arrays" if self.param_keys is None else len(self.param_keys)
        log(INFO, "\t│\t└── Control variate keys: %s", keys)
        super().summary()

    def _init_control(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero control variate for the trainable parameters of ``arrays``."""
        if self.param_keys is None:
            keys = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)]
        else:
            keys = self.param_keys
            missing = [k for k in keys if k not in arrays]
            if missing:
                raise ValueError(
                    f"param_keys names arrays the model does not have: {missing}; "
                    f"available: {list(arrays)}"
                )
        return {k: np.zeros_like(arrays[k]) for k in keys}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``x`` and ``N``, and add the control variate to each instruction."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        if self.control is None:
            self.control = self._init_control(self.current_arrays)
        self.num_total_nodes = len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = ArrayRecord({k: Array(v) for k, v in self.control.items()})
        for message in messages:
            message.content[SCAFFOLD_CONTROL_KEY] = control
        return messages

    def _pop_deltas(self, replies: list[Message]) -> list[dict[str, np.ndarray]]:
        """Remove and return each valid reply's control delta.

        FedAvg's validation expects exactly one ArrayRecord per reply and would
        average every ArrayRecord it finds, so the delta must leave the reply first.
        """
        deltas = []
        for msg in replies:
            if msg.has_error():
                continue
            if record_of(msg.content, SCAFFOLD_DELTA_KEY, ArrayRecord) is None:
                raise AggregationError(
                    f"a train reply from node {msg.metadata.src_node_id} has no "
                    f"{SCAFFOLD_DELTA_KEY!r} ArrayRecord; is the ClientApp running SCAFFOLD?"
                )
            record = msg.content.pop(SCAFFOLD_DELTA_KEY)
            deltas.append({k: a.numpy() for k, a in record.items()})
        return deltas

    def _update_control(self, deltas: list[dict[str, np.ndarray]]) -> None:
        """c <- c + (|S| / N) * mean_i delta_i."""
        assert self.control is not None and self.num_total_nodes
        scale = len(deltas) / max(self.num_total_nodes, len(deltas))
        for key, c in self.control.items():
            if any(key not in d or d[key].shape != c.shape for d in deltas):
                raise AggregationError(
                    f"{SCAFFOLD_DELTA_KEY!r} must hold {key!r} with shape {c.shape} in every reply"
                )
            mean_delta = np.mean([d[key] for d in deltas], axis=0)
            self.control[key] = (c + scale * mean_delta).astype(c.dtype, copy=False)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the models (FedAvg), take the global step and update ``c``."""
        if self.current_arrays is None or self.control is None:
            raise AggregationError(
                "SCAFFOLD has no global model or control variate; call configure_train "
                "before aggregate_train."
            )
        replies = list(replies)
        deltas = self._pop_deltas(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        if self.server_learning_rate != 1.0:
            arrays = self._global_step(arrays)
        self._update_control(deltas)
        return arrays, metrics

    def _global_step(self, averaged: ArrayRecord) -> ArrayRecord:
        """x + eta_g * (avg - x) on float arrays; other arrays keep the FedAvg value."""
        assert self.current_arrays is not None
        out = {}
        for key, array in averaged.items():
            avg = array.numpy()
            x = self.current_arrays[key]
            if np.issubdtype(x.dtype, np.floating):
                avg = (x + self.server_learning_rate * (avg - x)).astype(x.dtype)
            out[key] = Array(np.asarray(avg))
        return ArrayRecord(out)
