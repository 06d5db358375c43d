"""Tests of fedimb.sampling: target distributions, determinism and errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedimb.registry import RegistryError
from fedimb.sampling import epoch_indices, list_samplers

# A skewed client: classes 0, 2, 3, 6 present (400, 100, 20, 5 samples), others absent.
COUNTS = {0: 400, 2: 100, 3: 20, 6: 5}
EPOCHS = 300


def make_labels(seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in COUNTS.items()])
    return np.random.default_rng(seed).permutation(labels)  # classes interleaved


def class_frequencies(name: str, labels: np.ndarray, epochs: int = EPOCHS, **kw):
    rng = np.random.default_rng(123)
    drawn = np.concatenate([epoch_indices(name, labels, rng, **kw) for _ in range(epochs)])
    freq = np.bincount(labels[drawn], minlength=10) / len(drawn)
    return freq, drawn


def target(weights: dict[int, float]) -> np.ndarray:
    out = np.zeros(10)
    for c, w in weights.items():
        out[c] = w
    return out / out.sum()


def test_list_samplers():
    assert list_samplers() == ["class-balanced", "drs", "instance", "sqrt", "undersample"]


def test_instance_is_a_permutation():
    labels = make_labels()
    order = epoch_indices("instance", labels, np.random.default_rng(1))
    assert order.dtype == np.int64
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert not np.array_equal(order, np.arange(len(labels)))


# Binomial standard deviation of a frequency over 300 * 525 draws is below 0.0013, so a
# tolerance of 0.01 is > 7 sigma: a correct sampler essentially never fails, and a wrong
# target (e.g. instance frequencies 0.76 / 0.19 / 0.04 / 0.01) always does.
@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("instance", COUNTS),
        ("class-balanced", dict.fromkeys(COUNTS, 1.0)),
        ("sqrt", {c: np.sqrt(n) for c, n in COUNTS.items()}),
        ("undersample", dict.fromkeys(COUNTS, 1.0)),
    ],
)
def test_class_frequencies_converge(name, weights):
    labels = make_labels()
    freq, _ = class_frequencies(name, labels)
    np.testing.assert_allclose(freq, target(weights), atol=0.01)


@pytest.mark.parametrize("name", ["class-balanced", "sqrt"])
def test_uniform_within_class_and_epoch_length(name):
    labels = make_labels()
    rng = np.random.default_rng(5)
    epochs = [epoch_indices(name, labels, rng) for _ in range(EPOCHS)]
    assert all(len(e) == len(labels) for e in epochs)
    drawn = np.concatenate(epochs)
    hits = np.bincount(drawn, minlength=len(labels))
    for c in COUNTS:
        members = hits[labels == c]
        # Each member's share of its class: 1/n_c, within a few binomial sigmas.
        share = members / members.sum()
        sigma = np.sqrt((1 / len(members)) / members.sum())
        assert np.all(np.abs(share - 1 / len(members)) < 6 * sigma + 1e-12), c
    # With replacement: a class-balanced epoch repeats its rare samples.
    if name == "class-balanced":
        assert len(np.unique(epochs[0])) < len(labels)


def test_undersample_exact_per_epoch():
    labels = make_labels()
    rng = np.random.default_rng(9)
    for _ in range(20):
        order = epoch_indices("undersample", labels, rng)
        assert len(order) == 5 * len(COUNTS)
        assert len(np.unique(order)) == len(order)  # without replacement
        per_class = np.bincount(labels[order], minlength=10)
        assert all(per_class[c] == 5 for c in COUNTS)
    # Every sample of the big class is eventually used (a new subset each epoch).
    # 2000 epochs of 5 out of 400: P(a given sample is never drawn) = (1 - 5/400)**2000 ~ 1e-11.
    _, drawn = class_frequencies("undersample", labels, epochs=2000)
    assert set(drawn[labels[drawn] == 0].tolist()) == set(np.flatnonzero(labels == 0).tolist())


@pytest.mark.parametrize("name", list_samplers())
def test_deterministic_for_a_given_rng(name):
    labels = make_labels()
    a = epoch_indices(name, labels, np.random.default_rng(42), server_round=5, num_rounds=5)
    b = epoch_indices(name, labels, np.random.default_rng(42), server_round=5, num_rounds=5)
    c = epoch_indices(name, labels, np.random.default_rng(43), server_round=5, num_rounds=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("drs_start", "num_rounds", "first"),
    [(None, 10, 9), (0.5, 5, 3), (3, 4, 3), (1, 3, 1), (0.9, 6, 6)],
)
def test_drs_switches_from_instance_to_class_balanced(drs_start, num_rounds, first):
    labels = make_labels()
    for server_round in range(1, num_rounds + 1):
        got = epoch_indices(
            "drs",
            labels,
            np.random.default_rng(7),
            server_round=server_round,
            num_rounds=num_rounds,
            drs_start=drs_start,
        )
        same_as = "class-balanced" if server_round >= first else "instance"
        want = epoch_indices(same_as, labels, np.random.default_rng(7))
        np.testing.assert_array_equal(got, want)


def test_one_class_and_empty_clients():
    labels = np.full(30, 4)
    for name in list_samplers():
        order = epoch_indices(name, labels, np.random.default_rng(0))
        assert np.all(labels[order] == 4) and len(order) == 30
        assert len(epoch_indices(name, np.zeros(0, dtype=int), np.random.default_rng(0))) == 0


def user_sampler(labels, rng, server_round, num_rounds):
    return np.arange(len(labels))[::-1][: server_round * 2]


def bad_sampler(labels, rng, server_round, num_rounds):
    return np.array([len(labels)])


def test_user_sampler_by_import_path():
    order = epoch_indices(
        f"{__name__}:user_sampler",
        np.arange(10) % 3,
        np.random.default_rng(0),
        server_round=2,
        num_rounds=3,
    )
    np.testing.assert_array_equal(order, [9, 8, 7, 6])
    with pytest.raises(
        ValueError, match=r"sampler .*bad_sampler.* epoch holds index 10, outside the 10 samples"
    ):
        epoch_indices(f"{__name__}:bad_sampler", np.arange(10) % 3, np.random.default_rng(0))


def test_unknown_sampler_lists_names():
    with pytest.raises(RegistryError) as info:
        epoch_indices("clas-balanced", make_labels(), np.random.default_rng(0))
    assert "'class-balanced'" in str(info.value) and "undersample" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"name": "instance", "drs_start": 0.5}, "drs_start"),
        ({"name": "drs", "drs_start": 0}, "drs_start"),
        ({"name": "drs", "drs_start": 1.5}, "drs_start"),
        ({"name": "drs", "drs_start": 11}, "after the last round"),
        ({"name": "drs", "drs_start": "0.5"}, "drs_start"),
        ({"name": "instance", "server_round": 11}, "server_round"),
        ({"name": "instance", "num_rounds": 0}, "num_rounds"),
        ({"name": "instance", "labels": np.array([0.5, 1.0])}, "integers"),
        ({"name": "instance", "labels": np.array([0, -1])}, ">= 0"),
        ({"name": "instance", "labels": np.zeros((2, 2), dtype=int)}, "1-D"),
        ({"name": "instance", "rng": 0}, "Generator"),
    ],
)
def test_bad_input(kwargs, word):
    call = {"labels": make_labels(), "rng": np.random.default_rng(0), "num_rounds": 10, **kwargs}
    name = call.pop("name")
    labels, rng = call.pop("labels"), call.pop("rng")
    with pytest.raises(ValueError, match=word):
        epoch_indices(name, labels, rng, **call)
