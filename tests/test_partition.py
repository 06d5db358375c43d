"""Properties of the partitioners in fedimb.data.partition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedimb.data.partition import (
    PARTITIONERS,
    class_counts,
    dirichlet,
    iid,
    label_skew,
    long_tail,
    partition,
    partition_params,
    shards,
)
from fedimb.registry import RegistryError


def balanced_labels(num_classes: int = 10, per_class: int = 50, seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``per_class`` samples of each class."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def skewed_labels(seed: int = 0) -> np.ndarray:
    """Unequal class sizes (30..120), shuffled."""
    rng = np.random.default_rng(seed)
    sizes = [30, 45, 60, 75, 90, 105, 120, 33, 47, 61]
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


def assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    """Each part sorted and unique, parts pairwise disjoint; return their union."""
    for p in parts:
        assert p.dtype.kind == "i"
        assert np.all(np.diff(p) > 0), "indices must be sorted ascending without repeats"
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == allidx.size, "parts overlap"
    return np.sort(allidx)


def assert_cover(parts: list[np.ndarray], n: int) -> None:
    np.testing.assert_array_equal(assert_disjoint(parts), np.arange(n))


ALL_SPLITS = [
    ("label-skew", {"classes_per_client": 1}),
    ("label-skew", {"classes_per_client": 2}),
    ("shards", {"shards_per_client": 2}),
    ("dirichlet", {"alpha": 0.5, "min_size": 5}),
    ("iid", {}),
]


# ------------------------------------------------------------------ shared properties


@pytest.mark.parametrize(("name", "params"), ALL_SPLITS)
@pytest.mark.parametrize("labels_fn", [balanced_labels, skewed_labels])
def test_disjoint_cover_when_every_class_is_drawn(name, params, labels_fn):
    labels = labels_fn()
    # 20 clients >= 10 classes: every class is some client's first class, so all is covered.
    parts = partition(name, labels, 20, np.random.default_rng(1), **params)
    assert len(parts) == 20
    assert all(p.size > 0 for p in parts)
    assert_cover(parts, labels.size)


@pytest.mark.parametrize(("name", "params"), ALL_SPLITS)
def test_same_seed_same_split_other_seed_differs(name, params):
    labels = skewed_labels()
    a = partition(name, labels, 20, np.random.default_rng(7), **params)
    b = partition(name, labels, 20, np.random.default_rng(7), **params)
    c = partition(name, labels, 20, np.random.default_rng(8), **params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(("name", "params"), ALL_SPLITS)
def test_global_rng_untouched(name, params):
    # The legacy global RNG is exactly what must stay untouched.
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    partition(name, skewed_labels(), 20, np.random.default_rng(0), **params)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002


# ----------------------------------------------------------------------- label skew


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("num_clients", [10, 20, 37])
def test_label_skew_exact_classes_per_client(k, num_clients):
    labels = skewed_labels()
    parts = label_skew(labels, num_clients, np.random.default_rng(3), classes_per_client=k)
    for i, p in enumerate(parts):
        held = set(np.unique(labels[p]).tolist())
        assert len(held) == k
        assert i % 10 in held, "client i must hold class i mod K"
    assert_cover(parts, labels.size)


def test_label_skew_splits_each_class_evenly_among_holders():
    labels = skewed_labels()
    parts = label_skew(labels, 25, np.random.default_rng(5), classes_per_client=2)
    counts = class_counts(labels, parts, 10)
    for c in range(10):
        shares = counts[:, c][counts[:, c] > 0]
        assert shares.sum() == np.sum(labels == c)
        assert shares.max() - shares.min() <= 1


def test_label_skew_drops_undrawn_classes():
    labels = balanced_labels(num_classes=10, per_class=20)
    parts = label_skew(labels, 3, np.random.default_rng(0), classes_per_client=1)
    # k=1 with 3 clients: exactly classes 0, 1, 2 are drawn; the other 7 are left out.
    used = assert_disjoint(parts)
    np.testing.assert_array_equal(used, np.flatnonzero(labels < 3))
    for i, p in enumerate(parts):
        assert set(labels[p].tolist()) == {i}


def test_label_skew_uses_present_classes_only():
    # Labels 3, 7, 9 only: "class i mod K" refers to the sorted present classes.
    labels = np.repeat([3, 7, 9], 10)
    parts = label_skew(labels, 6, np.random.default_rng(0), classes_per_client=1)
    assert [int(labels[p][0]) for p in parts] == [3, 7, 9, 3, 7, 9]


@pytest.mark.parametrize("k", [0, -1, 11])
def test_label_skew_bad_classes_per_client(k):
    with pytest.raises(ValueError, match="classes_per_client"):
        label_skew(balanced_labels(), 10, np.random.default_rng(0), classes_per_client=k)


def test_label_skew_client_without_data():
    labels = np.array([0, 0, 0, 1])  # class 1 has one sample but two k=1 clients hold it
    with pytest.raises(ValueError, match="no data"):
        label_skew(labels, 4, np.random.default_rng(0), classes_per_client=1)


# ---------------------------------------------------------------------------- shards


def test_shards_each_client_gets_whole_single_class_shards():
    labels = balanced_labels(num_classes=10, per_class=60)
    # 20 clients x 3 shards = 60 shards of 10 samples; 60 per class -> shards never mix.
    parts = shards(labels, 20, np.random.default_rng(2), shards_per_client=3)
    assert_cover(parts, labels.size)
    counts = class_counts(labels, parts, 10)
    assert np.all(counts % 10 == 0), "a client holds whole shards of 10"
    assert np.all(counts.sum(axis=1) == 30)
    assert np.all((counts > 0).sum(axis=1) <= 3)


def test_shards_uneven_sizes_still_cover():
    labels = skewed_labels()
    parts = shards(labels, 7, np.random.default_rng(0), shards_per_client=3)
    assert_cover(parts, labels.size)
    # 21 shards of a sorted array: each shard spans at most 2 classes when shards are
    # smaller than the smallest class, so a client holds at most 2 * 3 classes.
    counts = class_counts(labels, parts, 10)
    assert np.all((counts > 0).sum(axis=1) <= 6)
    sizes = counts.sum(axis=1)
    shard = labels.size // 21
    assert sizes.min() >= 3 * shard and sizes.max() <= 3 * (shard + 1)


def test_shards_errors():
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="shards_per_client"):
        shards(labels, 2, np.random.default_rng(0), shards_per_client=0)
    with pytest.raises(ValueError, match="shards"):
        shards(labels, 4, np.random.default_rng(0), shards_per_client=3)  # 12 shards > 10 samples


# ------------------------------------------------------------------------- dirichlet


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_min_size_and_cover(alpha):
    labels = skewed_labels()
    parts = dirichlet(labels, 10, np.random.default_rng(0), alpha=alpha, min_size=20)
    assert_cover(parts, labels.size)
    assert min(p.size for p in parts) >= 20


def test_dirichlet_alpha_controls_skew():
    labels = balanced_labels(num_classes=10, per_class=200)

    def mean_classes_held(alpha: float) -> float:
        parts = dirichlet(labels, 10, np.random.default_rng(0), alpha=alpha, min_size=1)
        counts = class_counts(labels, parts, 10)
        # Classes holding >= 5% of the client's data: robust to stray single samples.
        frac = counts / counts.sum(axis=1, keepdims=True)
        return float((frac >= 0.05).sum(axis=1).mean())

    assert mean_classes_held(0.05) < 4 < 9 < mean_classes_held(1000.0)


@pytest.mark.parametrize(
    ("alpha", "num_clients", "per_class"), [(0.1, 20, 500), (0.5, 20, 500), (1e-3, 10, 100)]
)
def test_dirichlet_deals_no_class_to_a_client_holding_its_share(alpha, num_clients, per_class):
    # NIID-Bench's rule, checked on the result: classes are dealt in label order, and a
    # client that got some of class k held fewer than N / num_clients samples before it.
    # (alpha 1e-3: most draws put all of a class's mass on one client, often a full one.)
    labels = balanced_labels(num_classes=10, per_class=per_class)
    share = labels.size / num_clients

    def dealt_beyond_share(balance: bool, seed: int) -> int:
        rng = np.random.default_rng(seed)
        parts = dirichlet(labels, num_clients, rng, alpha=alpha, min_size=1, balance=balance)
        counts = class_counts(labels, parts, 10)
        held_before = np.cumsum(counts, axis=1) - counts
        return int(((counts > 0) & (held_before >= share)).sum())

    assert [dealt_beyond_share(True, seed) for seed in range(20)] == [0] * 20
    if alpha >= 0.1:  # without the cap, alpha 1e-3 leaves some client empty: no split
        assert sum(dealt_beyond_share(False, seed) for seed in range(5)) > 0  # it can fail


def test_dirichlet_gives_up_with_clear_error():
    labels = balanced_labels(num_classes=2, per_class=50)
    with pytest.raises(ValueError, match=r"max_tries=3"):
        dirichlet(labels, 10, np.random.default_rng(0), alpha=0.01, min_size=10, max_tries=3)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(balanced_labels(), 5, np.random.default_rng(0), alpha=alpha)


def test_dirichlet_unreachable_min_size():
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(balanced_labels(per_class=5), 10, np.random.default_rng(0), alpha=1.0, min_size=6)


# ------------------------------------------------------------------------------- iid


def test_iid_sizes_balanced():
    labels = skewed_labels()
    parts = iid(labels, 7, np.random.default_rng(0))
    assert_cover(parts, labels.size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_more_clients_than_samples():
    labels = np.arange(5) % 2
    for name, params in ALL_SPLITS:
        params = {**params, "min_size": 1} if name == "dirichlet" else params
        with pytest.raises(ValueError, match="num_clients"):
            partition(name, labels, 6, np.random.default_rng(0), **params)


# ------------------------------------------------------------------------- long tail


def expected_long_tail(n_max: int, c: int, ratio: float, profile: str) -> list[int]:
    if profile == "exp":
        raw = [n_max * ratio ** (-i / (c - 1)) for i in range(c)]
    else:
        raw = [n_max if i < c // 2 else n_max / ratio for i in range(c)]
    return [max(1, math.floor(r + 1e-9)) for r in raw]


@pytest.mark.parametrize("profile", ["exp", "step"])
@pytest.mark.parametrize("ratio", [1.0, 10.0, 100.0, 1000.0])
def test_long_tail_counts(profile, ratio):
    labels = skewed_labels()  # smallest class has 30 samples -> n_max = 30
    kept = long_tail(labels, ratio, np.random.default_rng(0), profile=profile)
    assert np.all(np.diff(kept) > 0)
    got = np.bincount(labels[kept], minlength=10).tolist()
    assert got == expected_long_tail(30, 10, ratio, profile)


def test_long_tail_cifar_lt_numbers():
    # CIFAR-10-LT with rho=100 (Cao et al. 2019): 5000, 2997, 1796, ..., 50 per class.
    labels = np.repeat(np.arange(10), 5000)
    kept = long_tail(labels, 100, np.random.default_rng(0))
    got = np.bincount(labels[kept]).tolist()
    assert got == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_long_tail_deterministic():
    labels = skewed_labels()
    a = long_tail(labels, 10, np.random.default_rng(4))
    b = long_tail(labels, 10, np.random.default_rng(4))
    c = long_tail(labels, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_long_tail_errors():
    with pytest.raises(ValueError, match="ratio"):
        long_tail(balanced_labels(), 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="profile"):
        long_tail(balanced_labels(), 10, np.random.default_rng(0), profile="linear")


# -------------------------------------------------------------- registry & counts


def test_registry_names_and_dispatch_matches_direct_call():
    assert set(PARTITIONERS.names()) >= {"label-skew", "shards", "dirichlet", "iid"}
    labels = skewed_labels()
    via = partition("label-skew", labels, 12, np.random.default_rng(9), classes_per_client=2)
    direct = label_skew(labels, 12, np.random.default_rng(9), classes_per_client=2)
    assert all(np.array_equal(a, b) for a, b in zip(via, direct, strict=True))


def test_partition_params_defaults():
    assert partition_params("label-skew") == {"classes_per_client": 2}
    assert partition_params("shards") == {"shards_per_client": 2}
    assert set(partition_params("dirichlet")) == {"alpha", "min_size", "max_tries", "balance"}
    assert partition_params("dirichlet")["min_size"] == 10
    assert partition_params("dirichlet")["balance"] is True
    assert partition_params("iid") == {}


def test_unknown_partitioner_and_param():
    with pytest.raises(RegistryError, match="label-skew"):
        partition("label_skw", skewed_labels(), 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="classes_per_client"):
        partition("label-skew", skewed_labels(), 5, np.random.default_rng(0), classesPerClient=2)


def test_import_path_plugin():
    labels = skewed_labels()
    parts = partition("fedimb.data.partition:iid", labels, 4, np.random.default_rng(0))
    assert_cover(parts, labels.size)


def test_class_counts_matches_manual_count():
    labels = skewed_labels()
    parts = dirichlet(labels, 6, np.random.default_rng(0), alpha=0.3, min_size=5)
    counts = class_counts(labels, parts, 12)
    assert counts.dtype == np.int64 and counts.shape == (6, 12)
    for i, p in enumerate(parts):
        for c in range(12):
            assert counts[i, c] == sum(1 for j in p if labels[j] == c)
    with pytest.raises(ValueError, match="num_classes"):
        class_counts(labels, parts, 5)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2.0}, "num_clients"),
        ({"classes_per_client": 1.5}, "classes_per_client"),
        ({"classes_per_client": True}, "classes_per_client"),
    ],
)
def test_non_integer_counts_rejected(params, match):
    kwargs = {"num_clients": 4, "classes_per_client": 1, **params}
    with pytest.raises(ValueError, match=match):
        label_skew(
            balanced_labels(),
            kwargs["num_clients"],
            np.random.default_rng(0),
            classes_per_client=kwargs["classes_per_client"],
        )


def test_bad_labels_rejected():
    with pytest.raises(ValueError, match="labels"):
        iid(np.array([0.5, 1.0]), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels"):
        iid(np.array([[0, 1]]), 1, np.random.default_rng(0))


def test_dirichlet_equal_gives_equal_clients_with_dirichlet_skew():
    labels = balanced_labels(num_classes=10, per_class=300)
    parts = partition("dirichlet-equal", labels, 23, np.random.default_rng(0), alpha=0.1)
    assert_cover(parts, labels.size)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1  # 3,000 / 23: 130 or 131 each
    held = (class_counts(labels, parts, 10) > 0).sum(axis=1)
    iid_held = (class_counts(labels, iid(labels, 23, np.random.default_rng(0)), 10) > 0).sum(1)
    assert held.mean() < 6 and iid_held.min() == 10  # skewed, unlike an IID split
    again = partition("dirichlet-equal", labels, 23, np.random.default_rng(0), alpha=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    small_groups = partition(
        "dirichlet-equal", labels, 23, np.random.default_rng(0), alpha=0.1, group_size=5
    )
    assert not all(np.array_equal(a, b) for a, b in zip(parts, small_groups, strict=True))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"group_size": 0}, "group_size must be >= 1"),
        ({"min_share": 1.0}, r"min_share must be a number in \[0, 1\)"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": 1e-3, "min_share": 0.99, "max_tries": 2}, "group 1 of 3 "),
    ],
)
def test_dirichlet_equal_rejects_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        partition("dirichlet-equal", balanced_labels(), 25, np.random.default_rng(0), **params)


def test_dirichlet_equal_draws_per_group_of_clients(monkeypatch):
    import importlib

    # dirichlet_equal calls dirichlet from its own module (the package's `partition` is
    # the function, so import the module by name)
    part = importlib.import_module("fedimb.data.partition.proportions")

    draws, real = [], part.dirichlet

    def recording(labels, num_clients, rng, **params):
        draws.append((labels.size, num_clients, params["min_size"]))
        return real(labels, num_clients, rng, **params)

    monkeypatch.setattr(part, "dirichlet", recording)
    labels = balanced_labels(num_classes=10, per_class=250)  # 2,500 samples
    parts = part.dirichlet_equal(labels, 25, np.random.default_rng(0), alpha=1.0)
    # FedDF's groups: 10 + 10 + 5 clients; chunks of 10/25 of the data, the rest to the last;
    # each client of a group at least half the group's mean.
    assert draws == [(1000, 10, 50), (1000, 10, 50), (500, 5, 50)]
    assert sorted({p.size for p in parts}) == [100]
