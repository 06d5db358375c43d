"""An example custom strategy to copy: FedAvg with a server learning rate.

Use it without touching fedimb's code, by import path (config overrides)::

    --set strategy.name=strategies.example_custom:ServerLRFedAvg --set strategy.server-lr=0.5

How to write your own:

1. Subclass ``flwr.serverapp.strategy.FedAvg`` (or ``Strategy``), in any importable
   module.
2. Add your hyper-parameters as keyword arguments of ``__init__`` and forward the rest
   (``**kwargs``) to the parent: fedimb's ``make_strategy`` reads the signature to
   check the ``strategy.*`` keys of the config, and passes its own defaults
   (``fraction_train``, the metric aggregation functions, ...) through ``**kwargs``.
3. Override one hook and call ``super()`` for the standard work: here
   ``aggregate_train`` takes FedAvg's weighted average and then moves the global model
   only part of the way towards it. Never re-implement ``start()``.
4. Keep state in attributes (plain numpy): a pickled strategy is a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class ServerLRFedAvg(FedAvg):
    """FedAvg with a server learning rate: ``x <- x + server_lr * (fedavg(y) - x)``.

    ``server_lr = 1`` is FedAvg; ``< 1`` damps the round-to-round jumps that very
    heterogeneous (e.g. one-class) clients cause; ``> 1`` extrapolates.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        Server step size, > 0.
    **kwargs
        Forwarded to ``FedAvg``.
    """

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.current_arrays: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model: ``aggregate_train`` only sees the replies."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take FedAvg's average, then step from the old model towards it."""
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self.current_arrays is None:
            return averaged, metrics
        stepped = {}
        for key, array in averaged.items():
            avg, old = array.numpy(), self.current_arrays[key]
            # Integer buffers (BatchNorm's num_batches_tracked) are counters, not weights.
            if np.issubdtype(old.dtype, np.floating):
                avg = (old + self.server_lr * (avg - old)).astype(old.dtype)
            stepped[key] = Array(np.asarray(avg))
        return ArrayRecord(stepped), metrics
