"""Partitioners that deal indices: ``label-skew`` (NIID-Bench ``#C=k``), ``shards``
(McMahan et al. 2017) and ``iid``."""

from __future__ import annotations

import numpy as np

from fedimb.data.partition.core import (
    PARTITIONERS,
    _check_int,
    _check_no_empty,
    _check_num_clients,
    _sorted_parts,
    check_labels,
)


@PARTITIONERS.register("label-skew")
def label_skew(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, classes_per_client: int = 2
) -> list[np.ndarray]:
    """Give every client exactly ``classes_per_client`` classes (NIID-Bench ``#C=k``).

    Client ``i`` first gets class ``i mod K`` (``K`` = the classes present in
    ``labels``, in ascending order), then ``k - 1`` further distinct classes drawn at
    random. Each class's samples are shuffled and split as equally as possible among the
    clients holding it. A class that no client drew (possible when ``num_clients < K``)
    is left out of every partition (``fedimb run`` warns).

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]``.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    classes_per_client : int, default 2
        ``k``, the number of distinct classes each client holds (1 <= k <= K).

    Returns
    -------
    list of np.ndarray
        Sorted sample indices, one array per client.

    Raises
    ------
    ValueError
        If ``classes_per_client`` is outside ``[1, K]`` or a client would get no data
        (a class has fewer samples than the clients sharing it).
    """
    labels = check_labels(labels)
    _check_num_clients(num_clients, labels.size)
    present = np.unique(labels)
    k_total = present.size
    _check_int("classes_per_client", classes_per_client, 1)
    if classes_per_client > k_total:
        raise ValueError(
            f"classes_per_client must be between 1 and the number of classes ({k_total}), "
            f"got {classes_per_client}"
        )
    holders: list[list[int]] = [[] for _ in range(k_total)]
    for client in range(num_clients):
        first = client % k_total
        others = np.delete(np.arange(k_total), first)
        extra = rng.choice(others, size=classes_per_client - 1, replace=False)
        for c in (first, *extra.tolist()):
            holders[c].append(client)

    pieces: list[list[np.ndarray]] = [[np.empty(0, np.int64)] for _ in range(num_clients)]
    for c, clients in enumerate(holders):
        if not clients:
            continue  # undrawn class: documented as dropped
        idx = rng.permutation(np.flatnonzero(labels == present[c]))
        for client, chunk in zip(clients, np.array_split(idx, len(clients)), strict=True):
            pieces[client].append(chunk)
    parts = _sorted_parts(pieces)
    _check_no_empty(
        parts,
        "a class has fewer samples than the clients sharing it; "
        "use fewer clients or more classes_per_client",
    )
    return parts


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, *, shards_per_client: int = 2
) -> list[np.ndarray]:
    """Sort by label, cut into equal shards and deal ``shards_per_client`` to each client.

    The pathological non-IID split of McMahan et al. (2017). Samples are shuffled before
    a stable sort by label, so which samples of a class share a shard is random. When
    ``N`` is not a multiple of the shard count, shard sizes differ by at most one.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]``.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    shards_per_client : int, default 2
        Shards per client (>= 1); there are ``num_clients * shards_per_client`` shards.

    Returns
    -------
    list of np.ndarray
        Sorted sample indices, one array per client.

    Raises
    ------
    ValueError
        If ``shards_per_client < 1`` or there are more shards than samples.
    """
    labels = check_labels(labels)
    _check_num_clients(num_clients, labels.size)
    _check_int("shards_per_client", shards_per_client, 1)
    num_shards = num_clients * shards_per_client
    if num_shards > labels.size:
        raise ValueError(
            f"num_clients * shards_per_client = {num_shards} shards exceed the "
            f"{labels.size} samples: some shard (and client) would be empty; "
            "lower num_clients or shards_per_client"
        )
    shuffled = rng.permutation(labels.size)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    cut = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _sorted_parts([[cut[s] for s in row] for row in dealt])


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split the samples uniformly at random into ``num_clients`` near-equal parts.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]`` (only its length is used).
    num_clients : int
        Number of clients (<= N).
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    list of np.ndarray
        Sorted sample indices, one array per client.
    """
    labels = check_labels(labels)
    _check_num_clients(num_clients, labels.size)
    return _sorted_parts(list(np.array_split(rng.permutation(labels.size), num_clients)))
