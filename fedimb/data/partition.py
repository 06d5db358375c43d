"""Non-IID partitions of a labelled training set across federated clients.

Every partitioner is a pure function of the integer ``labels`` and an
``np.random.Generator``: the same seed gives the same split, and nothing reads a global
RNG. Each returns one sorted index array per client; the arrays are disjoint and cover
every sample (``label_skew`` is the one exception: a class no client drew is left out).

Partitioners (names in :data:`PARTITIONERS`):

- ``"label-skew"``: ``#C=k`` of NIID-Bench (Li et al., 2022), each client holds exactly
  ``k`` classes;
- ``"shards"``: McMahan et al. (2017), sort by label and deal equal shards;
- ``"dirichlet"``: per-class client proportions drawn from ``Dir(alpha)``, NIID-Bench's
  ``noniid-labeldir`` (``balance``: a client holding its share takes no more classes);
- ``"dirichlet-equal"``: Dirichlet skew among equal-size clients, FedDF's split as the
  federated long-tail papers use it (CReFF);
- ``"iid"``: a uniform random split.

:func:`long_tail` builds a globally long-tailed subset (CIFAR-10-LT style, Cao et al.
2019) before partitioning; :func:`keep_fractions`, a subset with a keep fraction per
class (imbalanced IMDB).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedimb.registry import Registry, callable_params

__all__ = [
    "PARTITIONERS",
    "class_counts",
    "dirichlet",
    "dirichlet_equal",
    "iid",
    "keep_fractions",
    "label_skew",
    "long_tail",
    "long_tail_counts",
    "partition",
    "partition_params",
    "shards",
]

Partitioner = Callable[..., list[np.ndarray]]

PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

LONG_TAIL_PROFILES = ("exp", "step")


# ----------------------------------------------------------------------------- checks


def check_labels(labels: Any) -> np.ndarray:
    """``labels`` as a 1-D int64 array of non-negative class indices, or ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per sample), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    return labels.astype(np.int64, copy=False)


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    _check_int("num_clients", num_clients, 1)
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of samples ({num_samples}): "
            "some client would get no data; use at most as many clients as samples"
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_no_empty(parts: list[np.ndarray], hint: str) -> None:
    empty = [i for i, p in enumerate(parts) if p.size == 0]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"client(s) {shown} would get no data: {hint}")


def _sorted_parts(parts: list[list[np.ndarray]] | list[np.ndarray]) -> list[np.ndarray]:
    """Concatenate each client's pieces and sort, so the output is order-independent."""
    out = []
    for pieces in parts:
        arr = np.concatenate(pieces) if isinstance(pieces, list) else pieces
        out.append(np.sort(arr.astype(np.int64, copy=False)))
    return out


# ------------------------------------------------------------------------ partitioners


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


def long_tail(
    labels: np.ndarray, ratio: float, rng: np.random.Generator, profile: str = "exp"
) -> np.ndarray:
    """Indices of a long-tailed subset, as CIFAR-10-LT is built (Cao et al., 2019).

    With ``C`` classes (those present, ascending) and ``n_max`` the smallest original
    class count (so every class can supply its quota), class ``i`` keeps
    ``floor(n_max * ratio ** (-i / (C - 1)))`` samples for ``profile="exp"``, or
    ``n_max`` for the first ``C // 2`` classes and ``floor(n_max / ratio)`` for the rest
    for ``profile="step"``; at least one sample per class. Kept samples are chosen at
    random within each class.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``[N]``.
    ratio : float
        Imbalance ratio ``rho = n_max / n_min`` (>= 1; 1 keeps ``n_max`` per class).
    rng : np.random.Generator
        Source of randomness.
    profile : {"exp", "step"}
        Shape of the tail.

    Returns
    -------
    np.ndarray
        Sorted indices of the kept samples.

    Raises
    ------
    ValueError
        If ``ratio < 1`` or ``profile`` is unknown.
    """
    labels = check_labels(labels)
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if profile not in LONG_TAIL_PROFILES:
        raise ValueError(f"profile must be one of {LONG_TAIL_PROFILES}, got {profile!r}")
    if labels.size == 0:
        return np.empty(0, np.int64)
    present, counts = np.unique(labels, return_counts=True)
    quotas = long_tail_counts(int(counts.min()), present.size, ratio, profile)
    kept = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(present, quotas, strict=True)
    ]
    return np.sort(np.concatenate(kept).astype(np.int64))


def keep_fractions(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Indices of a subset keeping ``fractions[c]`` of class ``c``'s samples (at least
    one), chosen at random within each class: an imbalance set class by class, as Cao et
    al. (2019) keep a tenth of IMDB's negative reviews.

    Raises
    ------
    ValueError
        If there is not one fraction in (0, 1] per class.
    """
    labels = check_labels(labels)
    fractions = np.asarray(fractions, dtype=np.float64)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if fractions.ndim != 1 or fractions.size != num_classes:
        raise ValueError(
            f"expected one keep fraction per class ({num_classes} classes), got {fractions.size}"
        )
    if not np.all((fractions > 0) & (fractions <= 1)):
        raise ValueError(f"keep fractions must be in (0, 1], got {fractions.tolist()}")
    kept = []
    for c, fraction in enumerate(fractions):
        members = np.flatnonzero(labels == c)
        if members.size:
            quota = max(1, int(np.floor(fraction * members.size + 1e-9)))
            kept.append(rng.choice(members, size=quota, replace=False))
    return np.sort(np.concatenate(kept).astype(np.int64)) if kept else np.empty(0, np.int64)


def long_tail_counts(n_max: int, num_classes: int, ratio: float, profile: str) -> np.ndarray:
    """Per-class quotas of :func:`long_tail` (exposed for tests and reports)."""
    i = np.arange(num_classes)
    if profile == "exp":
        # C == 1 has no tail; avoid 0/0 in the exponent.
        expo = -i / (num_classes - 1) if num_classes > 1 else np.zeros(1)
        raw = n_max * np.power(float(ratio), expo)
    elif profile == "step":
        raw = np.where(i < num_classes // 2, float(n_max), n_max / float(ratio))
    else:
        raise ValueError(f"profile must be one of {LONG_TAIL_PROFILES}, got {profile!r}")
    # A tiny epsilon keeps exact powers (e.g. 100 * 10**-1 = 9.999...) from flooring down.
    return np.maximum(np.floor(raw + 1e-9).astype(np.int64), 1)


# -------------------------------------------------------------------------- registry


def partition_params(name: str) -> dict[str, Any]:
    """Parameters of partitioner ``name`` with their defaults (for config validation).

    Parameters without a default (possible in plug-ins) map to ``REQUIRED``.
    """
    return callable_params(PARTITIONERS.get(name), skip=3)[0]  # skip labels, clients, rng


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    **params: Any,
) -> list[np.ndarray]:
    """Split ``labels`` across ``num_clients`` with the partitioner registered as ``name``.

    Parameters
    ----------
    name : str
        A name in :data:`PARTITIONERS` or an import path ``"pkg.mod:func"`` to a function
        with the signature ``(labels, num_clients, rng, **params)``.
    labels, num_clients, rng
        As for the individual partitioners.
    **params
        Partitioner parameters, snake_case (``classes_per_client``,
        ``shards_per_client``, ``alpha``, ``min_size``, ``max_tries``, ``balance``).

    Raises
    ------
    ValueError
        For an unknown name (listing valid ones) or parameter.
    """
    fn = PARTITIONERS.get(name)
    valid, takes_any = callable_params(fn, skip=3)
    unknown = sorted(set(params) - set(valid))
    if unknown and not takes_any:
        raise ValueError(
            f"unknown parameter(s) {unknown} for partitioner {name!r}; "
            f"valid: {sorted(valid) or 'none'}"
        )
    return _checked_parts(fn(labels, num_clients, rng, **params), len(labels), num_clients, name)


def _checked_parts(parts: Any, num_samples: int, num_clients: int, name: str) -> list[np.ndarray]:
    """A partitioner's output as int64 index arrays, after checking what a plug-in may get
    wrong: one non-empty 1-D array of integer sample indices per client."""
    flat = isinstance(parts, str | bytes) or (isinstance(parts, np.ndarray) and parts.ndim < 2)
    try:
        parts = None if flat else list(parts)  # a list, a tuple, the rows of a 2-D array
    except TypeError:
        parts = None
    if parts is None or len(parts) != num_clients:
        got = f"{len(parts)} parts" if parts is not None else "no sequence of parts"
        raise ValueError(
            f"partitioner {name!r} returned {got} for num-clients = {num_clients}; it must "
            "return one index array per client (e.g. a list)"
        )
    out = [
        checked_indices(part, num_samples, f"partitioner {name!r}: client {i}'s part")
        for i, part in enumerate(parts)
    ]
    _check_no_empty(out, f"partitioner {name!r} must give every client at least one sample")
    return out


def checked_indices(values: Any, n: int, what: str) -> np.ndarray:
    """``values`` as int64 indices into ``n`` samples, or a ValueError that names ``what``
    (a plug-in's output) and says what was wrong."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"{what} has dtype {arr.dtype} and shape {list(arr.shape)}; it must be a 1-D "
            "array of integer sample indices"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = int(arr.min() if arr.min() < 0 else arr.max())
        raise ValueError(f"{what} holds index {bad}, outside the {n} samples (0..{n - 1})")
    return arr.astype(np.int64, copy=False)


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class counts, shape ``[num_clients, num_classes]``, dtype int64.

    Raises
    ------
    ValueError
        If a label is ``>= num_classes``.
    """
    labels = check_labels(labels)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} is too small for label {int(labels.max())}; "
            f"must be > max label"
        )
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, idx in enumerate(parts):
        out[i] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return out
