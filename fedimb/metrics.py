"""Classification metrics that add up across clients.

Everything here works on per-class *counts* (correct predictions and test samples per
class), never on accuracies: counts from many clients or many batches are summed first
and divided once at the end, so the global balanced error of a federated evaluation is
exactly the one a single evaluation of the whole test set would give.

Pure numpy; torch tensors are accepted as inputs (converted on the CPU). Importable
without Flower.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Shot groups of the long-tail literature (Liu et al. 2019, "Large-scale long-tailed
# recognition in an open world"): many > 100 training samples, medium 20-100, few < 20.
MANY_SHOT_ABOVE = 100  # a class is many-shot if it has strictly more training samples
FEW_SHOT_BELOW = 20  # a class is few-shot if it has strictly fewer training samples
SHOT_GROUPS = ("many_shot_error", "medium_shot_error", "few_shot_error")


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or sequence to a numpy array."""
    if hasattr(x, "detach"):  # a torch tensor: avoid importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from exc


def class_counts_from_predictions(
    preds: Any, targets: Any, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Count correct predictions and samples per class.

    Parameters
    ----------
    preds : array-like
        Predicted labels, shape ``[N]`` (ints), or scores/logits of shape
        ``[N, num_classes]`` (the arg-max is taken).
    targets : array-like
        True labels, shape ``[N]``, each in ``[0, num_classes)``.
    num_classes : int
        Number of classes ``C``.

    Returns
    -------
    correct : np.ndarray
        ``[C]`` int64, number of samples of class ``c`` predicted as ``c``.
    total : np.ndarray
        ``[C]`` int64, number of samples of class ``c``.

    Raises
    ------
    ValueError
        On a bad ``num_classes``, mismatched shapes or labels out of range.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    preds_np = _to_numpy(preds, "preds")
    targets_np = _to_numpy(targets, "targets")
    if preds_np.ndim == 2:
        if preds_np.shape[1] != num_classes:
            raise ValueError(
                f"preds has {preds_np.shape[1]} score columns, expected num_classes={num_classes}"
            )
        preds_np = preds_np.argmax(axis=1)
    if preds_np.ndim != 1 or targets_np.ndim != 1:
        raise ValueError(
            f"preds must have shape [N] or [N, C] and targets shape [N]; got preds "
            f"{preds_np.shape} and targets {targets_np.shape}"
        )
    if preds_np.shape[0] != targets_np.shape[0]:
        raise ValueError(
            f"preds and targets must have the same length, got {preds_np.shape[0]} "
            f"and {targets_np.shape[0]}"
        )
    targets_np = targets_np.astype(np.int64, copy=False)
    if targets_np.size and (targets_np.min() < 0 or targets_np.max() >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got values in "
            f"[{targets_np.min()}, {targets_np.max()}]"
        )
    hit = preds_np.astype(np.int64, copy=False) == targets_np
    total = np.bincount(targets_np, minlength=num_classes).astype(np.int64)
    correct = np.bincount(targets_np[hit], minlength=num_classes).astype(np.int64)
    return correct, total


def _check_counts(correct: Any, total: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (correct, total) pair of per-class count vectors."""
    correct_np = _to_numpy(correct, "correct").astype(np.int64)
    total_np = _to_numpy(total, "total").astype(np.int64)
    if correct_np.ndim != 1 or correct_np.shape != total_np.shape:
        raise ValueError(
            f"correct and total must be 1-D of the same length, got shapes "
            f"{correct_np.shape} and {total_np.shape}"
        )
    if (total_np < 0).any() or (correct_np < 0).any():
        raise ValueError("correct and total must be non-negative counts")
    if (correct_np > total_np).any():
        bad = int(np.flatnonzero(correct_np > total_np)[0])
        raise ValueError(f"correct[{bad}]={correct_np[bad]} exceeds total[{bad}]={total_np[bad]}")
    if total_np.sum() == 0:
        raise ValueError("total has no test samples in any class; metrics are undefined")
    return correct_np, total_np


def _group_error(errors: np.ndarray, evaluable: np.ndarray, members: np.ndarray) -> float | None:
    """Mean per-class error over the evaluable classes of a group, None if there are none."""
    mask = evaluable & members
    return float(errors[mask].mean()) if mask.any() else None


def classification_metrics(
    correct: Any,
    total: Any,
    train_counts: Any | None = None,
    *,
    many_shot_above: int = MANY_SHOT_ABOVE,
    few_shot_below: int = FEW_SHOT_BELOW,
) -> dict[str, Any]:
    """Balanced error, accuracy and per-class errors from per-class counts.

    Parameters
    ----------
    correct, total : array-like
        ``[C]`` per-class correct predictions and test samples (summed over clients or
        batches beforehand).
    train_counts : array-like, optional
        ``[C]`` global per-class training counts; enables the shot-group errors.
    many_shot_above, few_shot_below : int
        The shot groups' bounds (``few_shot_below <= many_shot_above + 1``).

    Returns
    -------
    dict
        ``balanced_error``: 1 - mean per-class recall, the mean taken over the classes
        with at least one test sample (a class absent from the test set has no recall,
        and counting it as 0 or 1 would bias the mean);
        ``accuracy``: sum(correct) / sum(total);
        ``per_class_error``: list of length C, ``None`` for classes with no test
        samples (kept in place so that index == class id; no NaN, so it is JSON-safe);
        ``worst_class_error``: the largest per-class error;
        ``num_evaluated_classes``: how many classes entered the balanced error;
        with ``train_counts``: ``many_shot_error`` (more than ``many_shot_above``
        training samples, default 100), ``medium_shot_error`` (the classes between, 20-100
        by default) and ``few_shot_error`` (fewer than ``few_shot_below``, default 20),
        each the mean
        per-class error of the group; a group without evaluable classes is omitted.

    Raises
    ------
    ValueError
        On mismatched shapes, negative counts, ``correct > total``, no test samples at
        all, ``train_counts`` of the wrong length, or overlapping shot groups.
    """
    correct_np, total_np = _check_counts(correct, total)
    evaluable = total_np > 0
    errors = np.zeros(total_np.shape, dtype=np.float64)
    errors[evaluable] = 1.0 - correct_np[evaluable] / total_np[evaluable]

    result: dict[str, Any] = {
        "balanced_error": float(errors[evaluable].mean()),
        "accuracy": float(correct_np.sum() / total_np.sum()),
        "per_class_error": [
            float(e) if ok else None for e, ok in zip(errors, evaluable, strict=True)
        ],
        "worst_class_error": float(errors[evaluable].max()),
        "num_evaluated_classes": int(evaluable.sum()),
    }
    if train_counts is not None:
        train_np = _to_numpy(train_counts, "train_counts")
        if train_np.shape != total_np.shape:
            raise ValueError(
                f"train_counts must have shape {total_np.shape} (one count per class), "
                f"got {train_np.shape}"
            )
        if few_shot_below > many_shot_above + 1:
            raise ValueError(
                f"few_shot_below={few_shot_below} > many_shot_above={many_shot_above} + 1: "
                "a class would be both many-shot and few-shot"
            )
        many, few = train_np > many_shot_above, train_np < few_shot_below
        members_of = (many, ~many & ~few, few)
        for key, members in zip(SHOT_GROUPS, members_of, strict=True):
            value = _group_error(errors, evaluable, members)
            if value is not None:
                result[key] = value
    return result
