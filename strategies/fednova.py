"""FedNova [Wang et al., 2020] strategy: normalised averaging of local updates.

Paper: https://arxiv.org/abs/2007.07481

Clients that take more local steps move further; plain FedAvg then drifts towards
their local optima (objective inconsistency). FedNova divides each client's update by
its effective number of steps ``a_i`` and rescales the average by ``tau_eff``.

Each train reply's MetricRecord must carry ``num-steps`` (the client's local optimizer
steps ``tau_i``) next to ``num-examples``; fedimb's clients (:class:`NovaClient`) also
send ``effective-steps`` (``a_i`` under their own momentum), which the server then
takes instead of computing it from ``num-steps`` and its ``momentum``.
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
from fedimb.protocol import NUM_STEPS_KEY
from fedimb.train import TrainResult, TrainSettings, effective_steps
from strategies.stock import FedAvg

EFFECTIVE_STEPS_KEY = "effective-steps"  # reply metric: a_i


class NovaClient(ClientHalf):
    """FedNova's client: plain local SGD, reporting its effective steps ``a_i``."""

    def prepare(
        self,
        instruction: RecordDict,
        state: RecordDict,
        global_params: Mapping[str, torch.Tensor],
        settings: TrainSettings,
    ) -> ClientTerms | None:
        """No gradient term; :meth:`finish` adds the metric."""
        return ClientTerms(self)

    def finish(
        self,
        terms: ClientTerms,
        global_params: Mapping[str, torch.Tensor],
        result: TrainResult,
        settings: TrainSettings,
        state: RecordDict,
    ) -> HalfReply:
        """a_i of the steps taken, under the momentum the client used."""
        steps = effective_steps(result.num_steps, settings.momentum)
        return HalfReply(metrics={EFFECTIVE_STEPS_KEY: steps})


class FedNova(FedAvg):
    """Federated normalised averaging.

    With ``x`` the global model, ``y_i`` client ``i``'s model, ``n_i`` its examples::

        p_i = n_i / sum_j n_j,   d_i = (x - y_i) / a_i,   tau_eff = sum_i p_i a_i
        x <- x - tau_eff * sum_i p_i d_i

    Only floating-point arrays are normalised; integer buffers (BatchNorm's
    ``num_batches_tracked``) take FedAvg's weighted average. A client reporting 0 steps
    did not move and contributes nothing. With equal ``tau_i`` and no momentum this
    is exactly FedAvg.

    Parameters
    ----------
    momentum : float (default: 0.0)
        The clients' SGD momentum ``rho`` in ``[0, 1)``; must match the ClientApp's
        optimizer (0 = plain SGD). fedimb's config passes its ``momentum``.
    **kwargs
        Forwarded to ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).
    """

    client_half = NovaClient()

    def __init__(self, *, momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.current_arrays: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        """Log the FedNova settings, then FedAvg's."""
        log(INFO, "\t├──> FedNova settings:")
        log(INFO, "\t│\t└── Client momentum: %s", self.momentum)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model ``x`` the clients start from."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def _client_terms(self, replies: list[Message]) -> list[tuple[float, float, ArrayRecord]]:
        """(n_i, a_i, y_i) for each valid reply."""
        terms = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            steps = metrics.get(NUM_STEPS_KEY)
            if isinstance(steps, list) or steps is None or steps < 0:
                raise AggregationError(
                    f"FedNova needs a non-negative scalar {NUM_STEPS_KEY!r} in each train "
                    f"reply; node {msg.metadata.src_node_id} sent {steps!r}"
                )
            weight = float(metrics[self.weighted_by_key])
            arrays = next(iter(msg.content.array_records.values()))
            sent = metrics.get(EFFECTIVE_STEPS_KEY)  # a client that knows its momentum
            a_i = float(sent) if sent is not None else effective_steps(float(steps), self.momentum)
            terms.append((weight, a_i, arrays))
        return terms

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg (validation, metrics, integer buffers), then the normalised step."""
        replies = list(replies)
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None:
            return averaged, metrics
        if self.current_arrays is None:
            raise AggregationError(
                "FedNova has no global model; call configure_train before aggregate_train."
            )
        if set(averaged.keys()) != set(self.current_arrays):
            raise AggregationError(
                "the clients' arrays do not have the keys of the global model; cannot "
                "compute the updates x - y_i."
            )
        terms = self._client_terms(replies)
        total = sum(n for n, _, _ in terms)
        probs = [n / total if total > 0 else 1.0 / len(terms) for n, _, _ in terms]
        tau_eff = sum(p * a for p, (_, a, _) in zip(probs, terms, strict=True))

        out = {}
        for key, fedavg_value in averaged.items():
            x = self.current_arrays[key]
            if not np.issubdtype(x.dtype, np.floating):
                out[key] = fedavg_value
                continue
            direction = np.zeros(x.shape, dtype=np.float64)
            for p, (_, a, arrays) in zip(probs, terms, strict=True):
                if a > 0:
                    direction += p * (x - arrays[key].numpy()) / a
            out[key] = Array(np.asarray((x - tau_eff * direction).astype(x.dtype)))
        return ArrayRecord(out), metrics
