"""Metric aggregation functions for Flower strategies.

Both functions have the signature Flower's strategies expect for
``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``:
``(records: list[RecordDict], weighting_key: str) -> MetricRecord``.

Per-class counts are *summed* across clients and divided once (pfl-research's
"metrics that add up"): averaging client accuracies would weight a one-class client's
perfect score like a global one and hide the classes nobody predicts.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import MetricRecord, RecordDict

from fedimb.metrics import classification_metrics

CORRECT_KEY = "correct-per-class"
COUNT_KEY = "count-per-class"
# Identifiers, not quantities: a weighted mean of them means nothing.
NON_AVERAGED_KEYS = frozenset({"partition-id"})


def _metric_records(records: Iterable[RecordDict]) -> list[MetricRecord]:
    """The (single) MetricRecord of each reply; a reply without one is an error."""
    out = []
    for i, record in enumerate(records):
        metric_records = list(record.metric_records.values())
        if len(metric_records) != 1:
            raise ValueError(
                f"records[{i}] must hold exactly one MetricRecord, found {len(metric_records)}"
            )
        out.append(metric_records[0])
    return out


def _weights(metrics: list[MetricRecord], weighting_key: str) -> list[float]:
    """Normalised weights from ``weighting_key``; uniform if they all are zero."""
    raw = []
    for i, record in enumerate(metrics):
        value = record.get(weighting_key)
        if isinstance(value, list) or value is None:
            raise ValueError(
                f"records[{i}] needs a scalar {weighting_key!r} to weight by, got {value!r}"
            )
        raw.append(float(value))
    total = sum(raw)
    if total <= 0:
        # Clients that all report 0 examples: fall back to a plain mean, not a 0/0.
        return [1.0 / len(raw)] * len(raw)
    return [w / total for w in raw]


def _weighted_scalar_means(
    metrics: list[MetricRecord], weights: list[float], weighting_key: str
) -> MetricRecord:
    """Weighted mean of every scalar key; the weighting key is summed instead."""
    out = MetricRecord()
    scalar_keys = {
        key
        for record in metrics
        for key, value in record.items()
        if not isinstance(value, list) and key not in NON_AVERAGED_KEYS
    }
    for key in sorted(scalar_keys):
        if key == weighting_key:
            total = sum(r[key] for r in metrics)  # e.g. the round's total examples
            out[key] = int(total) if isinstance(total, int) else float(total)
            continue
        present = [(w, float(r[key])) for r, w in zip(metrics, weights, strict=True) if key in r]
        weight_sum = sum(w for w, _ in present)
        if weight_sum > 0:
            out[key] = sum(w * v for w, v in present) / weight_sum
    return out


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of the scalar training metrics of the replies.

    Like Flower's default ``aggregate_metricrecords`` but (i) list-valued keys and
    ``partition-id`` are skipped, (ii) ``weighting_key`` is reported as the sum over
    clients (e.g. the round's total ``num-examples``) and (iii) a key missing from some
    replies is averaged over the replies that have it.

    Parameters
    ----------
    records : list[RecordDict]
        Reply contents, each with one MetricRecord.
    weighting_key : str
        Scalar key used as the weight (``"num-examples"``).

    Returns
    -------
    MetricRecord
    """
    if not records:
        return MetricRecord()
    metrics = _metric_records(records)
    return _weighted_scalar_means(metrics, _weights(metrics, weighting_key), weighting_key)


def _summed_list(metrics: list[MetricRecord], key: str) -> list[int]:
    """Element-wise sum of an int list across records; lengths must agree."""
    total: list[int] | None = None
    for i, record in enumerate(metrics):
        if key not in record:
            raise ValueError(f"records[{i}] lacks {key!r} while other records have it")
        values = [int(v) for v in record[key]]
        if total is None:
            total = values
        elif len(values) != len(total):
            raise ValueError(
                f"{key!r} has {len(values)} classes in records[{i}] but {len(total)} before"
            )
        else:
            total = [a + b for a, b in zip(total, values, strict=True)]
    assert total is not None
    return total


def aggregate_class_counts(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Aggregate federated-evaluation replies by summing per-class counts.

    Each reply's MetricRecord holds ``correct-per-class`` and ``count-per-class``
    (``list[int]``, one entry per class). The lists are summed across clients and the
    global metrics computed once from the sums (see ``fedimb.metrics``).

    Parameters
    ----------
    records : list[RecordDict]
        Evaluation reply contents, each with one MetricRecord.
    weighting_key : str
        Scalar key used to weight the other scalar metrics (e.g. a loss).

    Returns
    -------
    MetricRecord
        ``balanced-error``, ``accuracy``, ``worst-class-error``, the summed
        ``correct-per-class`` and ``count-per-class``, the summed ``weighting_key``, and
        the weighted mean of any other scalar key. If no reply carries per-class counts,
        only the weighted means are returned.

    Raises
    ------
    ValueError
        If only some replies carry the per-class lists, or their lengths differ.
    """
    if not records:
        return MetricRecord()
    metrics = _metric_records(records)
    out = _weighted_scalar_means(metrics, _weights(metrics, weighting_key), weighting_key)
    if not any(CORRECT_KEY in r or COUNT_KEY in r for r in metrics):
        return out
    correct = _summed_list(metrics, CORRECT_KEY)
    count = _summed_list(metrics, COUNT_KEY)
    if sum(count) == 0:
        return out  # nothing was evaluated: no error rate to report
    summary = classification_metrics(correct, count)
    out["balanced-error"] = summary["balanced_error"]
    out["accuracy"] = summary["accuracy"]
    out["worst-class-error"] = summary["worst_class_error"]
    out[CORRECT_KEY] = correct
    out[COUNT_KEY] = count
    return out
