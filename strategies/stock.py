"""Flower's FedAvg family with the weighted mean of the replies' arrays done by torch.

Flower's ``FedAvg.aggregate_train`` (and every strategy that calls it through
``super()``: FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi) averages the replies with
``aggregate_arrayrecords``: per reply array a fresh copy (``Array.numpy()``), a fresh
product with its weight, then an in-place sum, all in numpy on one core: for a CNN's
100 replies, a quarter of a vectorised round (benchmarks/README.md, "The server's FedAvg
mean").

:func:`weighted_array_mean` performs the same float32/float64 operations in the same
order (a product rounded to the array's dtype, then a sum), so its result is bit for bit
Flower's, but for large arrays (a CNN's dense layer) with torch on every core, one
scratch buffer per key instead of two new arrays per reply, and without copying the
replies' values (fedimb's in-process :class:`TensorArray` s are read as they are, plain
``Array`` s in their ``.npy`` bytes).
The classes below are Flower's own with only that step swapped in (their other
methods, parameters and pickled state are Flower's); Flower's originals stay reachable
by import path, e.g. ``strategy.name = "flwr.serverapp.strategy:FedAvg"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from fedimb.records import TensorArray, values_view

# Dtypes whose products and sums torch rounds exactly as numpy does; others (integer
# buffers, which numpy promotes to float64, float16) take numpy's own expression.
_TORCH_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Torch pays off from about here: it splits an operation between threads in chunks of
# 32,768 values, and a call costs ~10 us more than numpy's (all of a digits MLP's 100
# replies in torch: 7.4 ms against numpy's 4.2 ms). The CNN's 2.1 M-value dense layer
# is above; ResNet-32's arrays (at most 36,864 values) are not.
_TORCH_MIN_SIZE = 1 << 18


def _reversed(values: np.ndarray) -> bool:
    """Whether some stride is negative (torch cannot view such an array)."""
    return any(stride < 0 for stride in values.strides)


def _torch_can_sum(values: np.ndarray) -> bool:
    """Whether ``values`` are summed by torch: large, float32/float64, viewable."""
    return (
        values.dtype in _TORCH_DTYPES and values.size >= _TORCH_MIN_SIZE and not _reversed(values)
    )


class _WeightedSum:
    """``sum(values * weight)`` over the arrays added, in order, rounded as numpy rounds.

    Large float32 or float64 arrays of the first one's dtype and shape are read in place
    and summed by torch; small ones and other dtypes by Flower's own expression (for a
    small array its copy costs less than a read-only view); from the first array that
    does not match on, numpy's in-place expression takes over.
    """

    def __init__(self, array: Array, weight: float) -> None:
        values = values_view(array)
        self.dtype = values.dtype
        # A numpy scalar for a 0-d array, as in Flower (which makes it an array at the end).
        self.total: np.ndarray | np.generic | torch.Tensor = values * weight
        self.scratch: torch.Tensor | None = None
        if _torch_can_sum(values):
            self.total = torch.from_numpy(self.total)
            self.scratch = torch.empty_like(self.total)

    def result(self) -> np.ndarray | torch.Tensor:
        """The sum, as an array (or tensor)."""
        return self.total if self.scratch is not None else np.asarray(self.total)

    def add(self, array: Array, weight: float) -> None:
        """Add the array's values times ``weight`` to the total."""
        if self.scratch is None:
            self.total += array.numpy() * weight
            return
        values = values_view(array)
        if values.dtype != self.dtype or values.shape != self.total.shape or _reversed(values):
            self.total, self.scratch = self.total.numpy(), None
            self.total += values * weight
            return
        with warnings.catch_warnings():
            # A read-only array: torch warns it could be written through; it is not.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            tensor = torch.from_numpy(values)
        # Not ``add_(tensor, alpha=weight)``: a fused multiply-add rounds differently.
        torch.mul(tensor, weight, out=self.scratch)
        self.total += self.scratch


def weighted_array_mean(contents: list[RecordDict], weighting_key: str) -> ArrayRecord:
    """Weighted mean of the replies' ``ArrayRecord`` s, equal to Flower's
    ``aggregate_arrayrecords(contents, weighting_key)`` bit for bit.

    Parameters
    ----------
    contents : list of RecordDict
        Reply contents, already checked by the strategy (the first ``MetricRecord`` of
        each holds ``weighting_key``). As in Flower, every ``ArrayRecord`` of a reply is
        averaged, and arrays under the same key are summed whichever record holds them.
    weighting_key : str
        The metric that weights each reply, e.g. ``"num-examples"``.

    Returns
    -------
    ArrayRecord
        One array per key (host arrays, no ``.npy`` bytes until something reads them).
        Values, dtypes and shapes are Flower's; the memory order of a Fortran-ordered
        array may differ.
    """
    weights = []
    for content in contents:
        metrics = next(r for r in content.values() if isinstance(r, MetricRecord))
        weights.append(metrics[weighting_key])  # not float(): Flower sums ints exactly
    total_weight = sum(weights)
    sums: dict[str, _WeightedSum] = {}
    for content, weight in zip(contents, weights, strict=True):
        factor = weight / total_weight
        for record in content.values():
            if not isinstance(record, ArrayRecord):
                continue
            for key, array in record.items():
                if key in sums:
                    sums[key].add(array, factor)
                else:
                    sums[key] = _WeightedSum(array, factor)
    mean = ArrayRecord()  # ArrayRecord(dict) would turn each TensorArray into a plain Array
    for key, weighted_sum in sums.items():
        mean[key] = TensorArray(weighted_sum.result())
    return mean


class FedAvg(flwr_strategy.FedAvg):
    """Flower's ``FedAvg``; the replies' arrays are averaged by :func:`weighted_array_mean`."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies' arrays and metrics, as Flower's ``FedAvg`` does."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        contents = [reply.content for reply in valid_replies]
        arrays = weighted_array_mean(contents, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


# Each class puts our FedAvg between Flower's subclass and Flower's FedAvg in the method
# resolution order, so the subclass's ``super().aggregate_train`` reaches the mean above.
class FedAvgM(flwr_strategy.FedAvgM, FedAvg):
    """Flower's ``FedAvgM`` with :class:`FedAvg`'s array mean."""


class FedAdagrad(flwr_strategy.FedAdagrad, FedAvg):
    """Flower's ``FedAdagrad`` with :class:`FedAvg`'s array mean."""


class FedAdam(flwr_strategy.FedAdam, FedAvg):
    """Flower's ``FedAdam`` with :class:`FedAvg`'s array mean."""


class FedYogi(flwr_strategy.FedYogi, FedAvg):
    """Flower's ``FedYogi`` with :class:`FedAvg`'s array mean."""
