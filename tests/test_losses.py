"""Tests of fedimb.losses against independent, loop-based implementations of the papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fedimb.losses import (
    MISSING_POLICIES,
    Loss,
    LossParams,
    batched_imbalance_loss,
    imbalance_loss,
    imbalance_loss_tensors,
    initial_bias,
    list_losses,
    loss_defaults,
    make_loss,
    stack_params,
)
from fedimb.registry import RegistryError
from fedimb.schedule import switch_round

C = 10
B = 24
SEEDS = (0, 1, 2)
ALL_LOSSES = (
    "balanced-softmax",
    "ce",
    "class-balanced",
    "class-balanced-focal",
    "fedlc",
    "fedrs",
    "focal",
    "inverse-frequency",
    "inverse-sqrt-frequency",
    "ldam",
    "ldam-drw",
    "logit-adjusted",
)


# ----------------------------------------------------------------- reference formulas
# Written from the papers with plain Python loops in float64, sharing no code with the
# module, so that both values and autograd gradients are checked independently.


def ref_ce_terms(z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """-log softmax(z_i)[y_i] for every row, by the textbook formula."""
    out = []
    for i in range(z.shape[0]):
        denom = sum(torch.exp(z[i, j]) for j in range(z.shape[1]))
        out.append(torch.log(denom) - z[i, int(y[i])])
    return out


def ref_weighted_mean(terms, y, w) -> torch.Tensor:
    """F.cross_entropy(weight=w) reduction: sum w_y l / sum w_y."""
    num = sum(w[int(t)] * term for t, term in zip(y, terms, strict=True))
    return num / sum(w[int(t)] for t in y)


def normalise(w: list[float]) -> list[float]:
    total = sum(w)
    return [len(w) * v / total for v in w]


def ref_cb_weights(counts, beta) -> list[float]:
    return normalise([(1 - beta) / (1 - beta**n) for n in counts])


def ref_logit_shift(x, counts_fn) -> torch.Tensor:
    """x_ij + counts_fn(j) for every entry."""
    rows = []
    for i in range(x.shape[0]):
        rows.append(torch.stack([x[i, j] + counts_fn(j) for j in range(x.shape[1])]))
    return torch.stack(rows)


def ref_bce(z, t) -> torch.Tensor:
    sig = 1 / (1 + torch.exp(-z))
    return -(t * torch.log(sig) + (1 - t) * torch.log(1 - sig))


def ref_cb_sigmoid(x, y, w, gamma) -> torch.Tensor:
    """Cui et al.'s sigmoid (gamma = 0) and focal losses, summed / number of positives."""
    total = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            t = 1.0 if j == int(y[i]) else 0.0
            z = x[i, j]
            mod = torch.exp(-gamma * t * z - gamma * torch.log(1 + torch.exp(-z)))
            total = total + w[int(y[i])] * mod * ref_bce(z, torch.tensor(t, dtype=z.dtype))
    return total / x.shape[0]


def ref_focal(x, y, w, gamma) -> torch.Tensor:
    """LDAM-DRW's FocalLoss: ce_i weighted by w_y, p = exp(-ce_i), mean (1-p)^g ce_i."""
    terms = [w[int(t)] * ce for t, ce in zip(y, ref_ce_terms(x, y), strict=True)]
    return sum((1 - torch.exp(-ce)) ** gamma * ce for ce in terms) / len(terms)


def ref_ldam(x, y, counts, max_m, s, w) -> torch.Tensor:
    m = [1 / n**0.25 for n in counts]
    m = [v * max_m / max(m) for v in m]
    rows = []
    for i in range(x.shape[0]):
        rows.append(
            torch.stack(
                [s * (x[i, j] - (m[j] if j == int(y[i]) else 0.0)) for j in range(x.shape[1])]
            )
        )
    return ref_weighted_mean(ref_ce_terms(torch.stack(rows), y), y, w)


def reference(name: str, x, y, counts, **p) -> torch.Tensor:
    """The published loss (all classes present unless the formula defines absent ones).

    Logits are scaled by ``s`` (1 when None), inside LDAM's margin, before any offset."""
    ones = [1.0] * len(counts)
    scale = 1.0 if p.get("s") is None else p["s"]
    if name in ("ldam", "ldam-drw"):
        drw = ref_cb_weights(counts, p["drw_beta"]) if p.get("drw_start") == 1 else ones
        return ref_ldam(x, y, counts, p["max_m"], scale, drw)
    x = scale * x
    # DRW switched on from round 1: class-balanced weights (Cao et al.'s reference code).
    drw = ref_cb_weights(counts, p["drw_beta"]) if p.get("drw_start") == 1 else ones
    if name == "ce":
        return ref_weighted_mean(ref_ce_terms(x, y), y, drw)
    if name == "inverse-frequency":
        return ref_weighted_mean(ref_ce_terms(x, y), y, normalise([1 / n for n in counts]))
    if name == "inverse-sqrt-frequency":
        w = normalise([1 / math.sqrt(n) for n in counts])
        return ref_weighted_mean(ref_ce_terms(x, y), y, w)
    if name == "class-balanced":
        w = ref_cb_weights(counts, p["beta"])
        if p["base"] == "softmax":
            return ref_weighted_mean(ref_ce_terms(x, y), y, w)
        return ref_cb_sigmoid(x, y, w, p["gamma"] if p["base"] == "focal" else 0.0)
    if name == "focal":
        return ref_focal(x, y, drw, p["gamma"])
    if name == "balanced-softmax":
        return ref_weighted_mean(
            ref_ce_terms(ref_logit_shift(x, lambda j: math.log(counts[j])), y), y, ones
        )
    if name == "logit-adjusted":
        total = sum(counts)
        z = ref_logit_shift(x, lambda j: p["tau"] * math.log(counts[j] / total))
        return ref_weighted_mean(ref_ce_terms(z, y), y, ones)
    if name == "fedlc":
        z = ref_logit_shift(x, lambda j: -p["tau"] * counts[j] ** -0.25)
        return ref_weighted_mean(ref_ce_terms(z, y), y, ones)
    if name == "fedrs":
        rows = [
            torch.stack(
                [x[i, j] * (1.0 if counts[j] > 0 else p["alpha"]) for j in range(x.shape[1])]
            )
            for i in range(x.shape[0])
        ]
        return ref_weighted_mean(ref_ce_terms(torch.stack(rows), y), y, ones)
    raise KeyError(name)


CASES = [
    ("ce", {}),
    ("ce", {"drw_start": 1, "drw_beta": 0.99}),
    ("inverse-frequency", {}),
    ("inverse-sqrt-frequency", {}),
    ("class-balanced", {"beta": 0.99, "base": "softmax"}),
    ("class-balanced", {"beta": 0.999, "base": "sigmoid"}),
    ("class-balanced", {"beta": 0.99, "base": "focal", "gamma": 2.0}),
    ("class-balanced", {"beta": 0.9999, "base": "focal", "gamma": 0.5}),
    ("focal", {"gamma": 2.0}),
    ("focal", {"gamma": 0.5}),
    ("focal", {"gamma": 2.0, "drw_start": 1, "drw_beta": 0.999}),
    ("ldam", {"max_m": 0.5, "s": 30.0}),
    ("ldam-drw", {"drw_start": 1, "drw_beta": 0.99}),
    ("ldam", {"max_m": 0.3, "s": 10.0}),
    ("balanced-softmax", {}),
    ("logit-adjusted", {"tau": 1.0}),
    ("logit-adjusted", {"tau": 0.5}),
    ("fedlc", {"tau": 1.0}),
    ("fedlc", {"tau": 2.5}),
    # Any loss scales its logits by s (a cosine head's): inside the offsets and weights.
    ("ce", {"s": 30.0}),
    ("class-balanced", {"beta": 0.99, "base": "focal", "gamma": 2.0, "s": 2.0}),
    ("balanced-softmax", {"s": 16.0}),
    ("fedrs", {"alpha": 0.3, "s": 30.0}),
]


def random_problem(seed: int, counts=None):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    if counts is None:
        counts = rng.integers(1, 500, size=C).tolist()
    present = [j for j, n in enumerate(counts) if n > 0]
    x = 3 * torch.randn(B, len(counts), generator=gen, dtype=torch.float64)
    y = torch.tensor(rng.choice(present, size=B), dtype=torch.long)
    return x, y, counts


def value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("name", "params"), CASES)
def test_matches_published_formula(name, params, seed):
    x, y, counts = random_problem(seed)
    loss = make_loss(name, counts, **params)
    full = {**loss_defaults(name), **params}
    got, got_grad = value_and_grad(lambda v: loss(v, y), x)
    want, want_grad = value_and_grad(lambda v: reference(name, v, y, counts, **full), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_fedrs_scales_absent_logits(seed, alpha):
    counts = [30, 0, 12, 0, 0, 7, 0, 1, 0, 0]
    x, y, _ = random_problem(seed, counts)
    loss = make_loss("fedrs", counts, alpha=alpha)
    got, got_grad = value_and_grad(lambda v: loss(v, y), x)
    want, want_grad = value_and_grad(lambda v: reference("fedrs", v, y, counts, alpha=alpha), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("seed", SEEDS)
def test_ce_equals_torch_cross_entropy(seed):
    x, y, counts = random_problem(seed)
    x32 = x.float()
    torch.testing.assert_close(make_loss("ce", counts)(x32, y), F.cross_entropy(x32, y))
    w = torch.tensor(normalise([1 / n for n in counts]), dtype=torch.float32)
    torch.testing.assert_close(
        make_loss("inverse-frequency", counts)(x32, y), F.cross_entropy(x32, y, weight=w)
    )


def test_focal_with_gamma_zero_is_ce():
    x, y, counts = random_problem(5)
    torch.testing.assert_close(
        make_loss("focal", counts, gamma=0.0)(x, y), make_loss("ce", counts)(x, y)
    )


def test_low_precision_logits_reduce_in_float32():
    x, y, counts = random_problem(3)
    out = make_loss("ldam", counts)(x.bfloat16(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, make_loss("ldam", counts)(x.bfloat16().float(), y))


# ----------------------------------------------------------------- missing classes

SKEWED = ([250, 250] + [0] * 8, [500] + [0] * 9, [0, 0, 0, 7, 0, 0, 0, 0, 1, 0])


def variants():
    """(name, params) covering every loss, every policy, every CB base and DRW switched on."""
    out = []
    for name in ALL_LOSSES:
        defaults = loss_defaults(name)
        policies = MISSING_POLICIES if "missing" in defaults else (None,)
        for policy in policies:
            params = {} if policy is None else {"missing": policy}
            if name == "class-balanced":
                out += [(name, {**params, "base": b}) for b in ("softmax", "sigmoid", "focal")]
            elif "drw_start" in defaults:
                out += [(name, params), (name, {**params, "drw_start": 1})]
            else:
                out.append((name, params))
    out += [
        ("focal", {"gamma": 0.5, "missing": "mask"}),
        ("focal", {"gamma": 3.0}),
        ("fedrs", {"alpha": 0.0}),
        ("ldam", {"missing": "clamp", "min_count": 0.5}),
    ]
    return out


@pytest.mark.parametrize("counts", SKEWED, ids=["two-class", "one-class", "sparse"])
@pytest.mark.parametrize(("name", "params"), variants())
def test_missing_classes_stay_finite(name, params, counts):
    x, y, _ = random_problem(7, counts)
    loss = make_loss(name, counts, **params)
    for logits in (x, 20 * x, x.float(), (20 * x).float()):
        value, g = value_and_grad(lambda v: loss(v, y), logits)
        assert torch.isfinite(value), (name, params, counts)
        assert torch.isfinite(g).all(), (name, params, counts)
        if name == "ldam":
            assert value >= 0


@pytest.mark.parametrize(
    "name", ["ce", "ldam", "balanced-softmax", "logit-adjusted", "fedlc", "class-balanced", "focal"]
)
def test_mask_policy_removes_absent_classes(name):
    counts = [250, 250] + [0] * 8
    x, y, _ = random_problem(11, counts)
    _, g = value_and_grad(lambda v: make_loss(name, counts, missing="mask")(v, y), x)
    assert torch.all(g[:, 2:] == 0)
    # The other policies keep absent classes as negatives: they are pushed down.
    _, g = value_and_grad(lambda v: make_loss(name, counts, missing="present")(v, y), x)
    assert torch.all(g[:, 2:] > 0)
    # The mask limit of a one-class client is identically zero (documented).
    value = make_loss(name, [500] + [0] * 9, missing="mask")(x, torch.zeros(B, dtype=torch.long))
    assert value == 0


def test_mask_equals_softmax_over_present_classes():
    counts = [0, 40, 0, 0, 10, 0, 0, 0, 3, 0]
    x, y, _ = random_problem(12, counts)
    keep = [1, 4, 8]
    sub_y = torch.tensor([keep.index(int(t)) for t in y])
    sub_counts = [counts[j] for j in keep]
    for name in ("balanced-softmax", "logit-adjusted", "fedlc", "ldam", "inverse-frequency"):
        got = make_loss(name, counts, missing="mask")(x, y)
        want = make_loss(name, sub_counts)(x[:, keep], sub_y)
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("name", ["balanced-softmax", "logit-adjusted", "fedlc"])
def test_present_policy_treats_absent_classes_as_typical(name):
    # Balanced present classes: every class gets the same offset, so the loss is plain CE.
    counts = [0, 120, 0, 0, 120, 0, 0, 0, 0, 0]
    x, y, _ = random_problem(13, counts)
    torch.testing.assert_close(
        make_loss(name, counts, missing="present")(x, y), F.cross_entropy(x, y)
    )


def test_clamp_policy_uses_min_count():
    counts = [0, 40, 0, 0, 10, 0, 0, 0, 3, 0]
    x, y, _ = random_problem(14, counts)
    for min_count in (1, 0.25):
        clamped = [max(n, min_count) for n in counts]
        got = make_loss("balanced-softmax", counts, missing="clamp", min_count=min_count)(x, y)
        want = reference("balanced-softmax", x, y, clamped)
        torch.testing.assert_close(got, want)
        got = make_loss("ldam", counts, missing="clamp", min_count=min_count)(x, y)
        want = ref_ldam(x, y, clamped, 0.5, 1.0, [1.0] * C)
        torch.testing.assert_close(got, want)


def test_present_policy_statistics():
    counts = [0, 40, 0, 0, 10, 0, 0, 0, 0, 0]
    p = make_loss("class-balanced", counts, beta=0.99).params
    w = ref_cb_weights([40, 10], 0.99)
    expected = [1.0] * C
    expected[1], expected[4] = w
    torch.testing.assert_close(p.weight, torch.tensor(expected, dtype=torch.float32))
    p = make_loss("ldam", counts, max_m=0.4).params
    expected = [0.0] * C
    expected[1], expected[4] = 0.4 * (10 / 40) ** 0.25, 0.4
    torch.testing.assert_close(p.margin, torch.tensor(expected, dtype=torch.float32))
    # A one-class client: weights collapse to 1, the loss to plain (focal) CE.
    x, y, _ = random_problem(15, [500] + [0] * 9)
    for base in ("softmax", "sigmoid"):
        cb = make_loss("class-balanced", [500] + [0] * 9, base=base)(x, y)
        ce = F.cross_entropy(x, y) if base == "softmax" else ref_cb_sigmoid(x, y, [1.0] * C, 0.0)
        torch.testing.assert_close(cb, ce)


def test_missing_defaults_are_documented_choices():
    for name in (
        "ce",
        "inverse-frequency",
        "inverse-sqrt-frequency",
        "class-balanced",
        "focal",
        "ldam",
        "ldam-drw",
        "balanced-softmax",
        "logit-adjusted",
    ):
        assert loss_defaults(name)["missing"] == "present"
    assert loss_defaults("fedlc")["missing"] == "clamp"
    assert "missing" not in loss_defaults("fedrs")


def test_target_of_masked_class_stays_finite():
    p = make_loss("ce", [5, 5, 0], missing="mask").params
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value = imbalance_loss(x, torch.tensor([2, 2, 0, 1]), p)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------- DRW schedule


@pytest.mark.parametrize("name", ["ce", "focal", "ldam"])
@pytest.mark.parametrize(
    ("drw_start", "num_rounds", "first"),
    [
        (3, 5, 3),
        (1, 4, 1),
        (0.5, 5, 3),
        (0.8, 200, 161),
        (0.8, 20, 17),
        (0.01, 10, 1),
        (0.7, 10, 8),
    ],
)
def test_drw_switch(name, drw_start, num_rounds, first):
    counts = [300, 40, 7, 1, 0, 90, 12, 5, 2, 60]
    present = [n for n in counts if n > 0]
    cb = ref_cb_weights(present, 0.999)
    expected = torch.ones(C)
    expected[torch.tensor(counts) > 0] = torch.tensor(cb, dtype=torch.float32)
    for server_round in sorted({1, max(first - 1, 1), first, num_rounds}):
        p = make_loss(
            name,
            counts,
            server_round=server_round,
            num_rounds=num_rounds,
            drw_start=drw_start,
            drw_beta=0.999,
        ).params
        want = expected if server_round >= first else torch.ones(C)
        torch.testing.assert_close(p.weight, want)


def test_ldam_drw_defaults_to_fraction():
    assert loss_defaults("ldam-drw")["drw_start"] == 0.8
    assert loss_defaults("ldam")["drw_start"] is None
    counts = [100, 10, 1]
    # The reference's schedule: epochs 0-159 of 200 unweighted, the last 40 re-weighted.
    before = make_loss("ldam-drw", counts, server_round=160, num_rounds=200).params
    after = make_loss("ldam-drw", counts, server_round=161, num_rounds=200).params
    assert torch.all(before.weight == 1)
    torch.testing.assert_close(
        after.weight, torch.tensor(ref_cb_weights(counts, 0.9999), dtype=torch.float32)
    )
    off = make_loss("ldam-drw", counts, server_round=200, num_rounds=200, drw_start=None)
    assert torch.all(off.params.weight == 1)


@pytest.mark.parametrize("bad", [0, -1, 6, 1.5, 1.0, 0.0, True, "0.5", float("nan")])
def test_drw_start_errors(bad):
    with pytest.raises(ValueError, match="drw_start"):
        make_loss("ce", [3, 4], num_rounds=5, drw_start=bad)


def test_switch_round_rules():
    assert switch_round(None, 10) is None
    assert switch_round(4, 10) == 4
    assert switch_round(0.25, 10) == 3  # 2 rounds (floor 2.5) before it
    assert switch_round(0.3, 10) == 4  # 3 rounds before it, from 0.30000000000000004 * 10
    assert switch_round(0.29, 100) == 30  # 29 before it, not 28 from 28.999999999999996
    with pytest.raises(ValueError, match="after the last round"):
        switch_round(11, 10)


# ----------------------------------------------------------------- registry and params


def test_list_losses():
    assert list_losses() == sorted(ALL_LOSSES)


def test_unknown_loss_lists_names():
    with pytest.raises(RegistryError) as info:
        make_loss("ldma", [1, 2])
    message = str(info.value)
    assert "ldma" in message and "'ldam'" in message and "balanced-softmax" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="valid"):
        loss_defaults("nope")


def test_unknown_param_names_it_and_lists_valid():
    with pytest.raises(ValueError) as info:
        make_loss("class-balanced", [3, 4], betta=0.9)
    message = str(info.value)
    assert "'betta'" in message and "beta" in message and "min_count" in message
    with pytest.raises(ValueError, match="'gamma'"):
        make_loss("ldam", [3, 4], gamma=1.0)


@pytest.mark.parametrize(
    ("name", "params", "word"),
    [
        ("class-balanced", {"beta": 1.0}, "beta"),
        ("class-balanced", {"beta": -0.1}, "beta"),
        ("class-balanced", {"gamma": -1.0}, "gamma"),
        ("class-balanced", {"base": "tanh"}, "base"),
        ("focal", {"gamma": -0.5}, "gamma"),
        ("ldam", {"s": 0.0}, "s"),
        ("ldam", {"max_m": 0.0}, "max_m"),
        ("ldam", {"max_m": float("inf")}, "max_m"),
        ("ldam", {"drw_beta": 1.0}, "drw_beta"),
        ("fedrs", {"alpha": 1.5}, "alpha"),
        ("fedrs", {"alpha": -0.1}, "alpha"),
        ("logit-adjusted", {"tau": -1.0}, "tau"),
        ("fedlc", {"tau": "1"}, "tau"),
        ("balanced-softmax", {"missing": "ignore"}, "missing"),
        ("balanced-softmax", {"min_count": 0}, "min_count"),
    ],
)
def test_out_of_range_params(name, params, word):
    with pytest.raises(ValueError, match=word):
        make_loss(name, [3, 4, 5], **params)


@pytest.mark.parametrize(
    "counts", [[0, 0, 0], [3, -1, 2], [5], [[1, 2], [3, 4]], [1.5, 2], ["a", 1], [float("nan"), 1]]
)
def test_bad_counts(counts):
    with pytest.raises(ValueError, match="class_counts"):
        make_loss("ce", counts)


def test_counts_accept_arrays_and_tensors():
    for counts in (np.array([3, 0, 4]), torch.tensor([3, 0, 4]), (3.0, 0.0, 4.0)):
        assert make_loss("ldam", counts).params.num_classes == 3


def test_wrong_number_of_logits():
    with pytest.raises(ValueError, match="class_counts of length 3"):
        make_loss("ce", [1, 2, 3])(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"server_round": 0}, "server_round"),
        ({"server_round": 3, "num_rounds": 2}, "server_round"),
        ({"num_rounds": 0}, "num_rounds"),
    ],
)
def test_bad_rounds(kw, word):
    with pytest.raises(ValueError, match=word):
        make_loss("ce", [1, 2], **kw)


# ----------------------------------------------------------------- plug-ins

CALLS: list[dict] = []


def params_factory(class_counts, server_round, num_rounds, shift=2.0):
    """A user loss that is a member of the family: a constant offset on class 0."""
    CALLS.append({"counts": class_counts, "server_round": server_round, "num_rounds": num_rounds})
    c = len(class_counts)
    offset = torch.zeros(c)
    offset[0] = shift
    return LossParams(
        weight=torch.ones(c),
        offset=offset,
        scale=torch.ones(c),
        margin=torch.zeros(c),
        mask=torch.ones(c, dtype=torch.bool),
    )


def callable_factory(class_counts, server_round, num_rounds, **params):
    def loss(logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=params.get("smoothing", 0.0))

    return loss


def bad_factory(class_counts, server_round, num_rounds):
    return 42


def test_import_path_factory_returning_params():
    CALLS.clear()
    loss = make_loss(
        f"{__name__}:params_factory", [4, 0, 6], server_round=2, num_rounds=3, shift=1.5
    )
    assert CALLS[0]["server_round"] == 2 and CALLS[0]["num_rounds"] == 3
    assert CALLS[0]["counts"].tolist() == [4, 0, 6]
    assert loss.params is not None
    x, y, _ = random_problem(3, [4, 0, 6])
    shifted = x.clone()
    shifted[:, 0] += 1.5
    torch.testing.assert_close(loss(x, y), F.cross_entropy(shifted, y))
    assert loss_defaults(f"{__name__}:params_factory") == {"shift": 2.0}


def test_import_path_factory_returning_callable():
    loss = make_loss(f"{__name__}:callable_factory", [4, 6], smoothing=0.1)
    assert isinstance(loss, Loss) and loss.params is None
    x, y, _ = random_problem(4, [4, 6])
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, label_smoothing=0.1))


def test_import_path_errors():
    with pytest.raises(ValueError, match="expected a Loss"):
        make_loss(f"{__name__}:bad_factory", [1, 2])
    with pytest.raises(RegistryError, match="no attribute"):
        make_loss(f"{__name__}:missing_factory", [1, 2])
    with pytest.raises(RegistryError, match="cannot import"):
        make_loss("no_such_module_xyz:f", [1, 2])


# ----------------------------------------------------------------- vmap


VMAP_CASES = [
    ("ldam", {"drw_start": 1}),
    ("focal", {"gamma": 0.5, "missing": "mask"}),
    ("class-balanced", {"base": "focal", "gamma": 2.0, "beta": 0.99}),
    ("balanced-softmax", {}),
    ("fedrs", {}),
]


@pytest.mark.parametrize(("name", "params"), VMAP_CASES)
def test_vmap_equals_separate_calls(name, params):
    client_counts = ([500] + [0] * 9, [250, 250] + [0] * 8, [37, 5, 0, 80, 1, 9, 0, 3, 14, 60])
    problems = [random_problem(20 + k, counts) for k, counts in enumerate(client_counts)]
    losses = [make_loss(name, counts, **params) for counts in client_counts]
    x = torch.stack([p[0] for p in problems]).float()
    y = torch.stack([p[1] for p in problems])
    stacked = stack_params([loss.params for loss in losses])
    assert stacked.weight.shape == (3, C) and stacked.mask.dtype == torch.bool

    def one(lg, t, w, o, sc, m, mk):
        return imbalance_loss_tensors(
            lg, t, w, o, sc, m, mk, s=stacked.s, gamma=stacked.gamma, base=stacked.base
        )

    tensors = (stacked.weight, stacked.offset, stacked.scale, stacked.margin, stacked.mask)
    values = vmap(one)(x, y, *tensors)
    grads = vmap(grad(one))(x, y, *tensors)
    for k, loss in enumerate(losses):
        want, want_grad = value_and_grad(lambda v: loss(v, y[k]), x[k])  # noqa: B023
        torch.testing.assert_close(values[k], want)
        torch.testing.assert_close(grads[k], want_grad)
    torch.testing.assert_close(batched_imbalance_loss(x, y, stacked), values)


def test_stack_params_rejects_mixed_scalars():
    a = make_loss("ldam", [3, 4]).params
    with pytest.raises(ValueError, match="s must be equal"):
        stack_params([a, make_loss("ldam", [3, 4], s=10.0).params])
    with pytest.raises(ValueError, match="gamma"):
        stack_params([make_loss("focal", [3, 4]).params, make_loss("ce", [3, 4]).params])
    with pytest.raises(ValueError, match="base"):
        stack_params(
            [
                make_loss("class-balanced", [3, 4], base="sigmoid").params,
                make_loss("ce", [3, 4]).params,
            ]
        )
    with pytest.raises(ValueError, match="shape"):
        stack_params([a, make_loss("ldam", [3, 4, 5]).params])
    with pytest.raises(ValueError, match="empty"):
        stack_params([])


def test_loss_params_validation():
    ok = {
        "weight": torch.ones(3),
        "offset": torch.zeros(3),
        "scale": torch.ones(3),
        "margin": torch.zeros(3),
        "mask": torch.ones(3, dtype=torch.bool),
    }
    with pytest.raises(ValueError, match="shape"):
        LossParams(**{**ok, "offset": torch.zeros(4)})
    with pytest.raises(ValueError, match="bool"):
        LossParams(**{**ok, "mask": torch.ones(3)})
    with pytest.raises(ValueError, match="gamma"):
        LossParams(**ok, gamma=-1.0)
    with pytest.raises(ValueError, match="base"):
        LossParams(**ok, base="focal")
    with pytest.raises(ValueError, match="s must"):
        LossParams(**ok, s=0.0)


@pytest.mark.parametrize(
    ("name", "params"), [*VMAP_CASES, ("ce", {}), ("class-balanced", {"base": "sigmoid"})]
)
def test_padding_rows_change_neither_loss_nor_gradient(name, params):
    """A short batch padded with rows marked invalid has the short batch's loss and
    gradient, and the padding rows get no gradient (the vectorised trainer relies on it)."""
    x, y, _ = random_problem(7)
    short = 9
    loss = make_loss(name, [40, 3, 0, 12, 5, 1, 0, 9, 2, 30], **params)
    p = loss.params

    def value(logits, targets, valid=None):
        return imbalance_loss_tensors(
            logits, targets, p.weight, p.offset, p.scale, p.margin, p.mask,
            s=p.s, gamma=p.gamma, base=p.base, valid=valid,
        )  # fmt: skip

    want, want_grad = torch.func.grad_and_value(value)(x[:short], y[:short])[::-1]
    valid = torch.arange(len(y)) < short
    got, got_grad = torch.func.grad_and_value(value)(x, y, valid)[::-1]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad[:short], want_grad)
    assert torch.count_nonzero(got_grad[short:]) == 0
    # All rows valid is the same as no mask at all.
    torch.testing.assert_close(value(x, y, torch.ones_like(valid)), value(x, y))


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_sigmoid_class_balanced_losses_start_every_class_at_the_prior(num_classes):
    # Cui et al.'s code: bias -log(C - 1), so that sigmoid(bias) = 1 / C for every class.
    for base in ("sigmoid", "focal"):
        bias = initial_bias("class-balanced", num_classes, base=base)
        assert 1 / (1 + math.exp(-bias)) == pytest.approx(1 / num_classes)
        assert initial_bias("class-balanced", num_classes, base=base, prior_init=False) is None
    assert initial_bias("class-balanced", num_classes) is None  # softmax: shift-invariant
    # CB Focal under its own name is class-balanced with the focal base, biases included.
    focal = initial_bias("class-balanced", num_classes, base="focal")
    assert initial_bias("class-balanced-focal", num_classes) == focal
    assert initial_bias("class-balanced-focal", num_classes, prior_init=False) is None
    assert all(
        initial_bias(name, num_classes) is None
        for name in list_losses()
        if not name.startswith("class-balanced")
    )


def test_class_balanced_focal_is_class_balanced_with_the_focal_base():
    counts = np.array([500, 300, 0, 40, 5])
    logits, targets = torch.randn(B, 5), torch.randint(0, 5, (B,))
    named = make_loss("class-balanced-focal", counts, beta=0.999, gamma=2.0)
    based = make_loss("class-balanced", counts, beta=0.999, gamma=2.0, base="focal")
    torch.testing.assert_close(named(logits, targets), based(logits, targets), rtol=0, atol=0)
    softmax = make_loss("class-balanced", counts, beta=0.999)
    assert not torch.equal(named(logits, targets), softmax(logits, targets))


def test_the_initial_global_model_gets_the_prior_biases_and_nothing_else_changes():
    from fedimb.config import load_config
    from fedimb.federation import get_federation, init_model

    def initial(model=None, **loss):
        overrides = {f"loss.{k}": v for k, v in loss.items()} | {
            f"model.{k}": v for k, v in (model or {}).items()
        }
        config = load_config(overrides=overrides)
        return init_model(config, get_federation(config)).state_dict()

    plain = initial(name="ce")
    focal = initial(name="class-balanced", base="focal")
    head = list(plain)[-1]  # the MLP's classifier bias
    assert torch.equal(focal[head], torch.full((10,), -math.log(9)))
    assert all(torch.equal(plain[k], focal[k]) for k in plain if k != head)
    assert all(
        torch.equal(plain[k], v)
        for k, v in initial(name="class-balanced", base="focal", **{"prior-init": False}).items()
    )
    # A cosine head has no bias; a hidden layer as wide as the classes keeps its own.
    narrow = {"hidden": 10, "cosine-head": True}
    cosine = initial(narrow, name="ce")
    assert all(
        torch.equal(cosine[k], v)
        for k, v in initial(narrow, name="class-balanced", base="focal").items()
    )


@pytest.mark.parametrize(
    ("overrides", "scale"),
    [
        ({"loss.name": "ce"}, 1.0),  # a linear head's logits as they are
        ({"loss.name": "ce", "model.cosine-head": True}, 30.0),  # cosines need a scale
        ({"loss.name": "ldam-drw"}, 30.0),  # LDAM turns the cosine head on: Cao et al.'s s
        ({"loss.name": "ldam", "model.cosine-head": False}, 1.0),  # s = 30 would diverge
        ({"loss.name": "fedlc", "model.cosine-head": True, "loss.s": 10.0}, 10.0),  # as set
        ({"loss.name": "focal", "loss.s": 2.0}, 2.0),
    ],
)
def test_a_cosine_head_scales_every_losss_logits_unless_s_is_set(overrides, scale):
    from fedimb.config import load_config
    from fedimb.federation import loss_kwargs

    config = load_config(overrides=overrides)
    kwargs = loss_kwargs(config)
    assert make_loss(config.loss.name, [5, 0, 3], **kwargs).params.s == scale


def test_a_user_loss_on_a_cosine_head_gets_no_scale_it_did_not_ask_for():
    from fedimb.config import load_config
    from fedimb.federation import loss_kwargs

    name = f"{__name__}:params_factory"
    config = load_config(overrides={"loss.name": name, "model.cosine-head": True})
    assert "s" not in loss_kwargs(config)


def test_every_built_in_parameter_has_a_validator_and_every_loss_takes_s():
    # A loss's defaults come from its factory's signature: a new parameter name needs a
    # validator in fedimb.losses.params.PARAM_CHECKS, or make_loss fails on every call.
    from fedimb.losses import PARAM_CHECKS

    for name in list_losses():
        defaults = loss_defaults(name)
        assert set(defaults) <= set(PARAM_CHECKS), name
        assert "s" in defaults and defaults["s"] is None, name


def test_ldam_drw_is_ldam_with_deferred_reweighting_on_by_default():
    assert loss_defaults("ldam-drw") == {**loss_defaults("ldam"), "drw_start": 0.8}
    counts = [30, 3, 0, 1]
    late = make_loss("ldam-drw", counts, server_round=9, num_rounds=10).params
    same = make_loss("ldam", counts, server_round=9, num_rounds=10, drw_start=0.8).params
    assert torch.equal(late.weight, same.weight) and torch.equal(late.margin, same.margin)
    assert not torch.equal(late.weight, torch.ones(4))
