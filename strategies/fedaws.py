"""FedAwS-style server spreadout [Yu et al., 2020] for clients with (almost) one class.

Paper: "Federated Learning with Only Positive Labels", https://arxiv.org/abs/2004.10342

A client that sees a single class only pulls its own class's classifier row towards
its features; nothing pushes the rows of different classes apart, and after averaging
the class embeddings can collapse together. FedAwS lets the server, after FedAvg,
take a few gradient steps on a spreadout regulariser of the classifier matrix
``W [C, d]``::

    R(W) = sum_{c != c'} max(0, nu - ||w_c - w_c'||)^2

(a sum over ordered pairs, so each unordered pair counts twice).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.exception import AggregationError
from flwr.supercore import log

from strategies.stock import FedAvg


def _pairwise_distances(weights: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows via the Gram matrix: O(C^2) memory, not C^2 d."""
    sq_norms = np.einsum("ij,ij->i", weights, weights)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * weights @ weights.T
    return np.sqrt(np.maximum(sq, 0.0))


def default_margin(weights: np.ndarray) -> float:
    """``sqrt(2) * mean row norm``: the distance between two orthogonal rows.

    The paper's analysis ties the regulariser to a cosine contrastive loss on
    normalised embeddings, where orthogonal classes sit ``sqrt(2)`` apart; scaling by
    the rows' mean norm carries that to unnormalised classifiers of any scale.
    """
    return float(np.sqrt(2.0) * np.linalg.norm(weights, axis=1).mean())


def spreadout_loss(weights: np.ndarray, margin: float) -> float:
    """``R(W) = sum_{c != c'} max(0, margin - ||w_c - w_c'||)^2``."""
    w = np.asarray(weights, dtype=np.float64)
    hinge = np.maximum(0.0, margin - _pairwise_distances(w))
    np.fill_diagonal(hinge, 0.0)
    return float((hinge**2).sum())


def spreadout_grad(weights: np.ndarray, margin: float) -> np.ndarray:
    """Gradient of ``spreadout_loss`` with respect to ``weights``.

    Row ``c`` gets ``sum_{c'} g_cc' (w_c - w_c')`` with
    ``g_cc' = -4 max(0, margin - D_cc') / D_cc'`` (factor 4: the pair appears twice
    in the ordered sum, and d/dD of the square gives 2). Coinciding rows (D = 0) have
    no direction to be pushed in and get no gradient from each other.
    """
    w = np.asarray(weights, dtype=np.float64)
    dist = _pairwise_distances(w)
    hinge = np.maximum(0.0, margin - dist)
    np.fill_diagonal(hinge, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(dist > 1e-12, -4.0 * hinge / dist, 0.0)
    return coef.sum(axis=1)[:, None] * w - coef @ w


def _last_matrix_key(arrays: ArrayRecord) -> str:
    """The key of the last 2-D floating-point array: the final linear layer's weight."""
    keys = [
        k
        for k, a in arrays.items()
        if len(a.shape) == 2 and np.issubdtype(np.dtype(a.dtype), np.floating)
    ]
    if not keys:
        raise AggregationError("FedAwS found no 2-D float array to use as the classifier")
    return keys[-1]


class FedAwS(FedAvg):
    """FedAvg followed by server-side spreadout steps on the classifier matrix.

    Parameters
    ----------
    spreadout_steps : int (default: 10)
        Gradient steps on ``R(W)`` per round (0 disables the regulariser: plain FedAvg).
    spreadout_lr : float (default: 0.01)
        Step size. ``R`` is a sum over ``C (C - 1)`` pairs, so its gradient grows with
        the number of classes: lower the rate for many classes (roughly ``< 1 / (4 C)``
        keeps a step from overshooting the margin).
    spreadout_margin : float, optional
        The margin ``nu``. None (default) uses ``sqrt(2) *`` the mean row norm of the
        averaged ``W`` each round (see ``default_margin``): rows are pushed until they
        are at least as far apart as orthogonal rows of that norm.
    classifier_key : str, optional
        Key of ``W`` (shape ``[C, d]``) in the ArrayRecord; default: the last 2-D float
        array (the final ``nn.Linear``'s weight).
    **kwargs
        Forwarded to ``FedAvg``.
    """

    def __init__(
        self,
        *,
        spreadout_steps: int = 10,
        spreadout_lr: float = 0.01,
        spreadout_margin: float | None = None,
        classifier_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(spreadout_steps, bool) or not isinstance(spreadout_steps, int):
            raise ValueError(f"spreadout_steps must be an int >= 0, got {spreadout_steps!r}")
        if spreadout_steps < 0:
            raise ValueError(f"spreadout_steps must be an int >= 0, got {spreadout_steps!r}")
        if not spreadout_lr > 0:
            raise ValueError(f"spreadout_lr must be > 0, got {spreadout_lr!r}")
        if spreadout_margin is not None and not spreadout_margin > 0:
            raise ValueError(f"spreadout_margin must be > 0 or None, got {spreadout_margin!r}")
        self.spreadout_steps = spreadout_steps
        self.spreadout_lr = float(spreadout_lr)
        self.spreadout_margin = spreadout_margin
        self.classifier_key = classifier_key

    def summary(self) -> None:
        """Log the spreadout settings, then FedAvg's."""
        log(INFO, "\t├──> FedAwS settings:")
        log(INFO, "\t│\t├── Spreadout steps: %s (lr %s)", self.spreadout_steps, self.spreadout_lr)
        margin = "auto" if self.spreadout_margin is None else self.spreadout_margin
        log(INFO, "\t│\t├── Margin: %s", margin)
        log(INFO, "\t│\t└── Classifier key: %s", self.classifier_key or "last 2-D array")
        super().summary()

    def spread(self, weights: np.ndarray) -> np.ndarray:
        """Run the spreadout steps on ``W`` and return the new matrix (same dtype)."""
        w = np.asarray(weights, dtype=np.float64)
        margin = self.spreadout_margin
        if margin is None:
            margin = default_margin(w)
        if margin <= 0:  # an all-zero W: no scale to spread to
            return np.asarray(weights)
        for _ in range(self.spreadout_steps):
            w = w - self.spreadout_lr * spreadout_grad(w, margin)
        return w.astype(np.asarray(weights).dtype)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg, then spread the classifier rows apart."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.spreadout_steps == 0:
            return arrays, metrics
        key = self.classifier_key or _last_matrix_key(arrays)
        if key not in arrays or len(arrays[key].shape) != 2:
            raise AggregationError(
                f"classifier_key {key!r} must name a 2-D array; 2-D arrays: "
                f"{[k for k, a in arrays.items() if len(a.shape) == 2]}"
            )
        arrays[key] = Array(self.spread(arrays[key].numpy()))
        return arrays, metrics
