"""Tests for fedimb.metrics, cross-checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from fedimb.metrics import class_counts_from_predictions, classification_metrics


def _random_predictions(seed: int, n: int = 500, num_classes: int = 7, absent: int = 2):
    """Labels that skip class ``absent`` and predictions right about 60% of the time."""
    rng = np.random.default_rng(seed)
    present = np.array([c for c in range(num_classes) if c != absent])
    targets = rng.choice(present, size=n, p=rng.dirichlet(np.ones(len(present))))
    noise = rng.integers(0, num_classes, size=n)
    preds = np.where(rng.random(n) < 0.6, targets, noise)
    return preds, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_counts_match_confusion_matrix(seed: int) -> None:
    preds, targets = _random_predictions(seed)
    correct, total = class_counts_from_predictions(preds, targets, 7)
    cm = confusion_matrix(targets, preds, labels=np.arange(7))
    np.testing.assert_array_equal(correct, np.diag(cm))
    np.testing.assert_array_equal(total, cm.sum(axis=1))
    assert correct.dtype == np.int64 and total.dtype == np.int64
    assert total[2] == 0  # the absent class


def test_class_counts_accept_logits_and_tensors() -> None:
    preds, targets = _random_predictions(3)
    logits = np.eye(7)[preds] * 5.0 - 1.0  # arg-max is the predicted label
    expected = class_counts_from_predictions(preds, targets, 7)
    for got in (
        class_counts_from_predictions(logits, targets, 7),
        class_counts_from_predictions(torch.from_numpy(logits), torch.from_numpy(targets), 7),
    ):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_error_matches_sklearn(seed: int) -> None:
    preds, targets = _random_predictions(seed)
    correct, total = class_counts_from_predictions(preds, targets, 7)
    metrics = classification_metrics(correct, total)
    # sklearn averages recall over the classes present in y_true, as we do.
    with pytest.warns(UserWarning):  # sklearn: y_pred has a class absent from y_true
        expected = 1.0 - balanced_accuracy_score(targets, preds)
    assert metrics["balanced_error"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(np.mean(preds == targets))
    cm = confusion_matrix(targets, preds, labels=np.arange(7))
    recall = np.diag(cm)[total > 0] / cm.sum(axis=1)[total > 0]
    assert metrics["worst_class_error"] == pytest.approx(1.0 - recall.min())
    assert metrics["per_class_error"][2] is None
    assert metrics["num_evaluated_classes"] == len(np.unique(targets))
    present_errors = [e for e in metrics["per_class_error"] if e is not None]
    np.testing.assert_allclose(present_errors, 1.0 - recall)


def test_shot_groups() -> None:
    correct = np.array([90, 50, 10, 5, 0])
    total = np.array([100, 100, 20, 10, 0])
    train = np.array([500, 101, 100, 19, 3])  # many, many, medium, few, few (no test)
    m = classification_metrics(correct, total, train_counts=train)
    assert m["many_shot_error"] == pytest.approx(np.mean([0.1, 0.5]))
    assert m["medium_shot_error"] == pytest.approx(0.5)
    assert m["few_shot_error"] == pytest.approx(0.5)  # class 4 has no test samples

    m = classification_metrics(correct[:2], total[:2], train_counts=train[:2])
    assert "medium_shot_error" not in m and "few_shot_error" not in m

    # CIFAR-10-LT's 3/4/3 split of classes: bounds of the config's [long-tail] table.
    m = classification_metrics(
        correct, total, train_counts=train, many_shot_above=200, few_shot_below=101
    )
    assert m["many_shot_error"] == pytest.approx(0.1)
    assert m["medium_shot_error"] == pytest.approx(0.5)  # class 1 (101 samples)
    assert m["few_shot_error"] == pytest.approx(np.mean([0.5, 0.5]))  # 100 and 19 samples
    with pytest.raises(ValueError, match="both many-shot and few-shot"):
        classification_metrics(correct, total, train, many_shot_above=10, few_shot_below=12)


def test_metrics_have_no_nan() -> None:
    m = classification_metrics([0, 3, 0], [0, 4, 0], train_counts=[1, 200, 50])
    assert m["balanced_error"] == pytest.approx(0.25)
    assert m["per_class_error"] == [None, pytest.approx(0.25), None]
    assert "few_shot_error" not in m and "medium_shot_error" not in m


@pytest.mark.parametrize(
    ("correct", "total", "match"),
    [
        ([2, 1], [1, 1], "exceeds total"),
        ([1, 1], [1, 1, 1], "same length"),
        ([0, 0], [0, 0], "no test samples"),
        ([-1, 0], [1, 1], "non-negative"),
    ],
)
def test_classification_metrics_rejects_bad_counts(correct, total, match) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(correct, total)


def test_classification_metrics_rejects_bad_train_counts() -> None:
    with pytest.raises(ValueError, match="train_counts"):
        classification_metrics([1, 1], [1, 1], train_counts=[5])


def test_class_counts_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="targets must lie"):
        class_counts_from_predictions([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="num_classes"):
        class_counts_from_predictions([0], [0], 0)
    with pytest.raises(ValueError, match="same length"):
        class_counts_from_predictions([0, 1], [0], 2)
    with pytest.raises(ValueError, match="score columns"):
        class_counts_from_predictions(np.zeros((2, 4)), [0, 1], 3)
