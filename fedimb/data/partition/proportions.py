"""Partitioners that draw each class's client proportions from a Dirichlet:
``dirichlet`` (NIID-Bench ``noniid-labeldir``) and ``dirichlet-equal`` (equal-size
clients, FedDF's split as the federated long-tail papers use it)."""

from __future__ import annotations

import numpy as np

from fedimb.data.partition.core import (
    PARTITIONERS,
    _check_int,
    _check_num_clients,
    _sorted_parts,
    check_labels,
)


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    min_size: int = 10,
    max_tries: int = 1000,
    balance: bool = True,
) -> list[np.ndarray]:
    """Split each class across clients with proportions drawn from ``Dir(alpha)``.

    Small ``alpha`` (e.g. 0.1) gives strongly skewed clients, large ``alpha`` tends to
    IID. The whole draw is repeated until every client holds at least ``min_size``
    samples. With ``balance`` (the split of NIID-Bench, Li et al. 2022, whose code most
    papers' Dirichlet splits come from), classes are dealt in label order and a client
    already holding ``N / num_clients`` samples gets none of the next class.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]``.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    alpha : float, default 0.5
        Dirichlet concentration (> 0).
    min_size : int, default 10
        Minimum samples per client (>= 1, and ``num_clients * min_size <= N``).
    max_tries : int, default 1000
        Draws to attempt before giving up.
    balance : bool, default True
        NIID-Bench's cap on a client's share; False draws every class independently of
        what the clients already hold (client sizes vary more).

    Returns
    -------
    list of np.ndarray
        Sorted sample indices, one array per client.

    Raises
    ------
    ValueError
        If ``alpha <= 0``, ``min_size`` is unreachable, or no draw within ``max_tries``
        gives every client ``min_size`` samples.
    """
    labels = check_labels(labels)
    _check_num_clients(num_clients, labels.size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_int("min_size", min_size, 1)
    _check_int("max_tries", max_tries, 1)
    if num_clients * min_size > labels.size:
        raise ValueError(
            f"min_size={min_size} is unreachable: {num_clients} clients x {min_size} > "
            f"{labels.size} samples; lower min_size or num_clients"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    share = labels.size / num_clients
    for _ in range(max_tries):
        pieces: list[list[np.ndarray]] = [[np.empty(0, np.int64)] for _ in range(num_clients)]
        held = np.zeros(num_clients, np.int64)
        for idx in by_class:
            props = _class_shares(
                rng, alpha, num_clients, held < share if balance else None, max_tries
            )
            # Rounded, not truncated: a client with no share gets exactly no sample.
            cuts = np.rint(np.cumsum(props)[:-1] * idx.size).astype(np.int64)
            for client, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                pieces[client].append(chunk)
                held[client] += chunk.size
        parts = _sorted_parts(pieces)
        if min(p.size for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"dirichlet: no split with every client holding >= min_size={min_size} samples "
        f"after max_tries={max_tries} draws (alpha={alpha}, {num_clients} clients, "
        f"{labels.size} samples); raise alpha, lower min_size or num_clients"
    )


def _class_shares(
    rng: np.random.Generator,
    alpha: float,
    num_clients: int,
    open_: np.ndarray | None,
    max_tries: int,
) -> np.ndarray:
    """One class's client proportions from ``Dir(alpha)``; with ``open_`` (a bool per
    client), only those clients share it. Some client is always open (the others hold
    less than N), but a tiny ``alpha`` can put all the mass on closed ones: draw again."""
    for _ in range(max_tries):
        props = rng.dirichlet(np.full(num_clients, float(alpha)))
        if open_ is None:
            return props
        props = props * open_
        if props.sum() > 0:
            return props / props.sum()
    raise ValueError(
        f"dirichlet: alpha={alpha} put every draw's mass on clients holding their share "
        f"after max_tries={max_tries}; raise alpha"
    )


@PARTITIONERS.register("dirichlet-equal")
def dirichlet_equal(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    group_size: int = 10,
    min_share: float = 0.5,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet label skew among clients of equal size: the split of FedDF's code (Lin et
    al. 2020) that the federated long-tail papers use (CReFF, Shang et al. 2022, and those
    built on its code), with ``[long-tail]`` for CIFAR-10-LT.

    The shuffled samples are cut into one chunk per group of ``group_size`` clients (in
    proportion to its clients); each group splits its chunk as :func:`dirichlet` does
    (NIID-Bench's cap, every client at least ``min_share`` of the group's mean). Then the
    clients' samples, client after client and each client's by class, are cut into
    ``num_clients`` contiguous parts whose sizes differ by at most one: so a client's
    classes come from one or two of the Dirichlet draws' clients.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]``.
    num_clients : int
        Number of clients.
    rng : np.random.Generator
        Source of randomness.
    alpha : float, default 0.5
        Dirichlet concentration (> 0).
    group_size : int, default 10
        Clients per Dirichlet draw (>= 1; FedDF's 10).
    min_share : float, default 0.5
        A client's minimum, in the Dirichlet draw, as a fraction of its group's mean
        (in [0, 1)).
    max_tries : int, default 1000
        Draws per group to attempt before giving up.

    Returns
    -------
    list of np.ndarray
        Sorted sample indices, one array per client.

    Raises
    ------
    ValueError
        For a bad parameter, or a group with no draw meeting ``min_share`` in
        ``max_tries``.
    """
    labels = check_labels(labels)
    _check_num_clients(num_clients, labels.size)
    _check_int("group_size", group_size, 1)
    if isinstance(min_share, bool) or not 0 <= min_share < 1:
        raise ValueError(f"min_share must be a number in [0, 1), got {min_share!r}")
    group_size = min(group_size, num_clients)
    order = rng.permutation(labels.size)
    groups = -(-num_clients // group_size)
    chunk = group_size * labels.size // num_clients
    dealt: list[np.ndarray] = []
    for g in range(groups):
        clients = group_size if g < groups - 1 else num_clients - group_size * (groups - 1)
        members = order[g * chunk :] if g == groups - 1 else order[g * chunk : (g + 1) * chunk]
        least = max(1, int(min_share * members.size / clients))  # min_size of this draw
        try:
            parts = dirichlet(
                labels[members], clients, rng, alpha=alpha, min_size=least, max_tries=max_tries
            )
        except ValueError as exc:
            raise ValueError(f"group {g + 1} of {groups} ({clients} clients): {exc}") from None
        for part in parts:
            mine = members[part]
            dealt.append(mine[np.argsort(labels[mine], kind="stable")])
    return [np.sort(p) for p in np.array_split(np.concatenate(dealt), num_clients)]
