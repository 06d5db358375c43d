"""Tests for the strategies, their registry and the metric aggregation functions.

In Flower's own style: build instruction and reply Messages by hand, call
``configure_train`` / ``aggregate_train`` directly and check the arithmetic against
numpy computed here.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from fedimb.records import TensorArray, state_record
from fedimb.registry import RegistryError
from strategies import list_strategies, make_strategy, stock, strategy_params
from strategies.aggregation import aggregate_class_counts, aggregate_train_metrics
from strategies.example_custom import ServerLRFedAvg
from strategies.fedaws import FedAwS, spreadout_grad, spreadout_loss
from strategies.fednova import FedNova, effective_steps
from strategies.scaffold import SCAFFOLD_CONTROL_KEY, SCAFFOLD_DELTA_KEY, Scaffold
from strategies.stock import weighted_array_mean

SHAPES = {"conv.weight": (3, 2), "bn.num_batches_tracked": (), "fc.weight": (4, 3), "fc.bias": (4,)}
PARAM_KEYS = ["conv.weight", "fc.weight", "fc.bias"]


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Messages read the run/node/task id of the current process; set and restore them."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    """The one Grid method ``configure_train`` uses."""

    def __init__(self, num_nodes: int) -> None:
        self.node_ids = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def make_state(seed: int) -> dict[str, np.ndarray]:
    """A small state_dict: float parameters plus an integer buffer."""
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    state["bn.num_batches_tracked"] = np.array(seed * 10, dtype=np.int64)
    return state


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def reply(
    arrays: dict[str, np.ndarray],
    metrics: dict,
    extra: dict[str, ArrayRecord] | None = None,
    node_id: int = 1,
) -> Message:
    """A train reply as our ClientApp sends it."""
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    content = RecordDict(
        {"arrays": to_record(arrays), "metrics": MetricRecord(metrics), **(extra or {})}
    )
    return Message(content, reply_to=instruction)


def train_metrics(n: int, steps: int = 5, loss: float = 1.0, pid: int = 0) -> dict:
    return {"num-examples": n, "train-loss": loss, "num-steps": steps, "partition-id": pid}


def weighted_mean(values: list[np.ndarray], weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(wi * v.astype(np.float64) for wi, v in zip(w, values, strict=True))


def configure(strategy: Strategy, x: dict[str, np.ndarray], rnd: int = 1, nodes: int = 2):
    return list(strategy.configure_train(rnd, to_record(x), ConfigRecord(), FakeGrid(nodes)))


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_weighted_mean_and_train_metrics() -> None:
    strategy = make_strategy("fedavg")
    ys, ns = [make_state(1), make_state(2)], [30, 10]
    replies = [
        reply(y, train_metrics(n, loss=loss, pid=i))
        for i, (y, n, loss) in enumerate(zip(ys, ns, [1.0, 3.0], strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    for key in SHAPES:
        np.testing.assert_allclose(
            arrays[key].numpy(), weighted_mean([y[key] for y in ys], ns), rtol=1e-6
        )
    assert metrics["train-loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert metrics["num-examples"] == 40
    assert "partition-id" not in metrics
    assert strategy.fraction_evaluate == 0.0


def test_fedavgm_momentum_two_rounds() -> None:
    lr, beta = 0.5, 0.9
    strategy = make_strategy("fedavgm", server_learning_rate=lr, server_momentum=beta)
    x = make_state(0)
    momentum = None
    for rnd, seeds in enumerate([(1, 2), (3, 4)], start=1):
        configure(strategy, x, rnd)
        ys = [make_state(s) for s in seeds]
        arrays, _ = strategy.aggregate_train(
            rnd, [reply(y, train_metrics(n)) for y, n in zip(ys, [1, 3], strict=True)]
        )
        grad = {k: x[k] - weighted_mean([y[k] for y in ys], [1, 3]) for k in ["fc.weight"]}
        momentum = grad if momentum is None else {k: beta * momentum[k] + grad[k] for k in grad}
        expected = x["fc.weight"] - lr * momentum["fc.weight"]
        np.testing.assert_allclose(arrays["fc.weight"].numpy(), expected, rtol=1e-5)
        x = to_numpy(arrays)


def test_fedadam_one_step_by_hand() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = make_strategy("fedadam", eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    x = make_state(0)
    del x["bn.num_batches_tracked"]
    configure(strategy, x)
    ys = [make_state(1), make_state(2)]
    for y in ys:
        del y["bn.num_batches_tracked"]
    arrays, _ = strategy.aggregate_train(
        1, [reply(y, train_metrics(n)) for y, n in zip(ys, [2, 1], strict=True)]
    )
    for key in x:
        delta = weighted_mean([y[key] for y in ys], [2, 1]) - x[key]
        m, v = (1 - b1) * delta, (1 - b2) * delta**2
        step = eta * np.sqrt(1 - b2**2) / (1 - b1**2)  # bias correction at t = round + 1
        expected = x[key] + step * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5)


# ------------------------------------------------------------------------- SCAFFOLD


def test_scaffold_sends_control_and_updates_it() -> None:
    eta_g, num_nodes = 0.5, 4
    strategy = Scaffold(server_learning_rate=eta_g, param_keys=PARAM_KEYS)
    x = make_state(0)
    messages = configure(strategy, x, nodes=num_nodes)
    assert len(messages) == num_nodes
    control = messages[0].content[SCAFFOLD_CONTROL_KEY]
    assert sorted(control.keys()) == sorted(PARAM_KEYS)  # buffers carry no control variate
    assert all(not a.numpy().any() for a in control.values())

    rng = np.random.default_rng(7)
    ys, ns = [make_state(1), make_state(2)], [10, 30]
    deltas = [{k: rng.normal(size=SHAPES[k]).astype(np.float32) for k in PARAM_KEYS} for _ in ys]
    replies = [
        reply(y, train_metrics(n), {SCAFFOLD_DELTA_KEY: to_record(d)}, node_id=i + 1)
        for i, (y, n, d) in enumerate(zip(ys, ns, deltas, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)

    for key in PARAM_KEYS:  # x + eta_g * (weighted mean of y_i - x)
        expected = x[key] + eta_g * (weighted_mean([y[key] for y in ys], ns) - x[key])
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(  # integer buffer: FedAvg's value
        arrays["bn.num_batches_tracked"].numpy(),
        weighted_mean([y["bn.num_batches_tracked"] for y in ys], ns),
    )
    for key in PARAM_KEYS:  # c <- 0 + |S|/N * mean delta_i
        expected_c = (2 / num_nodes) * (deltas[0][key] + deltas[1][key]) / 2
        np.testing.assert_allclose(strategy.control[key], expected_c, rtol=1e-6)

    # The next round ships the updated control variate.
    sent = configure(strategy, to_numpy(arrays), rnd=2, nodes=num_nodes)[0].content[
        SCAFFOLD_CONTROL_KEY
    ]
    np.testing.assert_allclose(sent["fc.weight"].numpy(), strategy.control["fc.weight"])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scaffold_clients_control_is_their_gradient_whatever_the_momentum(momentum) -> None:
    # A linear model on one repeated input, and a loss linear in its logits: every step
    # has the same gradient g, so option II's c_i+ (from c = c_i = 0) must be g itself.
    from flwr.app import Context

    from fedimb.algorithm import ClientTerms
    from fedimb.client import make_reply
    from fedimb.train import ClientJob, TrainSettings, make_plan, train_client

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.tensor([[1.0, -2.0, 0.5]]).repeat(8, 1)
    y = torch.zeros(8, dtype=torch.long)
    direction = torch.tensor([1.0, -3.0])
    settings = TrainSettings(lr=0.1, momentum=momentum, batch_size=4, epochs=3)
    plan = make_plan(y.numpy(), settings, np.random.default_rng(0))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in start.items()}
    terms = ClientTerms(Scaffold.client_half, {"correction": zeros}, keep=(zeros, zeros))
    job = ClientJob(x, y, lambda z, t: (z * direction).mean(0).sum(), plan, terms=terms)
    result = train_client(model, job, lambda t: t, settings)
    assert result.num_steps == 6

    msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    answer = make_reply(msg, context, terms, result, 0, settings, start, 0.0)
    control = {
        k: torch.from_numpy(a.numpy()) for k, a in answer.content[SCAFFOLD_DELTA_KEY].items()
    }
    torch.testing.assert_close(control["weight"], torch.outer(direction, x[0]))
    torch.testing.assert_close(control["bias"], direction)


def test_scaffold_infers_float_keys_skips_errors_and_requires_delta() -> None:
    strategy = Scaffold()
    x = make_state(0)
    configure(strategy, x)
    assert sorted(strategy.control) == sorted(k for k in SHAPES if k != "bn.num_batches_tracked")

    zero = {k: np.ones_like(v) for k, v in strategy.control.items()}
    instruction = Message(RecordDict(), dst_node_id=3, message_type=MessageType.TRAIN)
    failed = Message(Error(code=1, reason="client crashed"), reply_to=instruction)
    good = reply(make_state(1), train_metrics(5), {SCAFFOLD_DELTA_KEY: to_record(zero)})
    arrays, _ = strategy.aggregate_train(1, [good, failed])
    np.testing.assert_allclose(arrays["fc.bias"].numpy(), make_state(1)["fc.bias"])
    np.testing.assert_allclose(strategy.control["fc.bias"], 0.5 * np.ones(4))  # |S|=1, N=2

    configure(strategy, x, rnd=2)
    with pytest.raises(AggregationError, match=SCAFFOLD_DELTA_KEY):
        strategy.aggregate_train(2, [reply(make_state(1), train_metrics(5))])


def test_scaffold_rejects_unknown_param_keys() -> None:
    strategy = Scaffold(param_keys=["nope.weight"])
    with pytest.raises(ValueError, match=r"nope\.weight"):
        configure(strategy, make_state(0))


# -------------------------------------------------------------------------- FedNova


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_effective_steps_is_the_momentum_series(rho: float) -> None:
    for tau in [1, 2, 7, 20]:
        series = sum((1 - rho**k) / (1 - rho) for k in range(1, tau + 1))
        assert effective_steps(tau, rho) == pytest.approx(series)


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_fednova_normalises_by_local_steps(rho: float) -> None:
    """Client i moves a_i effective steps along its own direction g_i: y_i = x - a_i g_i.

    FedNova averages the per-step directions, x_new = x - tau_eff * sum_i p_i g_i, so a
    client's pull does not grow with its step count; FedAvg's x - sum_i p_i a_i g_i does.
    """
    strategy = FedNova(momentum=rho)
    x = make_state(0)
    configure(strategy, x)
    rng = np.random.default_rng(3)
    g = [{k: rng.normal(size=SHAPES[k]) for k in PARAM_KEYS} for _ in range(2)]
    taus, ns = [1, 10], [20, 60]
    a = [sum((1 - rho**k) / (1 - rho) for k in range(1, t + 1)) for t in taus]
    ys = []
    for i, ai in enumerate(a):
        y = {k: (x[k] - ai * g[i][k]).astype(np.float32) for k in PARAM_KEYS}
        y["bn.num_batches_tracked"] = np.array(100 * (i + 1), dtype=np.int64)
        ys.append(y)

    def replies() -> list[Message]:
        return [reply(y, train_metrics(n, steps=t)) for y, n, t in zip(ys, ns, taus, strict=True)]

    arrays, _ = strategy.aggregate_train(1, replies())
    p = [0.25, 0.75]
    tau_eff = p[0] * a[0] + p[1] * a[1]
    for key in PARAM_KEYS:
        expected = x[key] - tau_eff * (p[0] * g[0][key] + p[1] * g[1][key])
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["bn.num_batches_tracked"].numpy(), (20 * 100 + 60 * 200) / 80)

    fedavg, _ = FedAvg().aggregate_train(1, replies())
    biased = x["fc.weight"] - (p[0] * a[0] * g[0]["fc.weight"] + p[1] * a[1] * g[1]["fc.weight"])
    np.testing.assert_allclose(fedavg["fc.weight"].numpy(), biased, rtol=1e-4, atol=1e-5)
    assert not np.allclose(fedavg["fc.weight"].numpy(), arrays["fc.weight"].numpy())


def test_fednova_equals_fedavg_with_equal_steps() -> None:
    x, ys, ns = make_state(0), [make_state(1), make_state(2)], [5, 15]
    nova = FedNova()
    configure(nova, x)
    got, _ = nova.aggregate_train(
        1, [reply(y, train_metrics(n, steps=4)) for y, n in zip(ys, ns, strict=True)]
    )
    want, _ = FedAvg().aggregate_train(
        1, [reply(y, train_metrics(n, steps=4)) for y, n in zip(ys, ns, strict=True)]
    )
    for key in SHAPES:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-5, atol=1e-6)


def test_fednova_needs_num_steps() -> None:
    nova = FedNova()
    configure(nova, make_state(0))
    bad = [reply(make_state(i), {"num-examples": 3}) for i in (1, 2)]
    with pytest.raises(AggregationError, match="num-steps"):
        nova.aggregate_train(1, bad)
    with pytest.raises(ValueError, match="momentum"):
        FedNova(momentum=1.0)


# --------------------------------------------------------------------------- FedAwS


def test_spreadout_grad_matches_finite_differences() -> None:
    w = np.random.default_rng(0).normal(size=(5, 3))
    margin = 3.0  # large enough that most pairs are inside the margin
    grad = spreadout_grad(w, margin)
    eps = 1e-6
    numeric = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        plus, minus = w.copy(), w.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (spreadout_loss(plus, margin) - spreadout_loss(minus, margin)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_fedaws_spreads_classifier_only() -> None:
    strategy = FedAwS(spreadout_steps=20, spreadout_lr=0.02)
    ys, ns = [make_state(1), make_state(2)], [4, 4]
    for y in ys:  # nearly collapsed class rows, as one-class clients produce
        y["fc.weight"] = (
            np.ones((4, 3)) + 0.05 * np.random.default_rng(1).normal(size=(4, 3))
        ).astype(np.float32)
    replies = [reply(y, train_metrics(n)) for y, n in zip(ys, ns, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    averaged = weighted_mean([y["fc.weight"] for y in ys], ns)
    margin = np.sqrt(2) * np.linalg.norm(averaged, axis=1).mean()
    assert spreadout_loss(arrays["fc.weight"].numpy(), margin) < 0.5 * spreadout_loss(
        averaged, margin
    )
    for key in ["conv.weight", "fc.bias"]:  # untouched: FedAvg's average
        np.testing.assert_allclose(
            arrays[key].numpy(), weighted_mean([y[key] for y in ys], ns), rtol=1e-6
        )
    assert arrays["fc.weight"].numpy().dtype == np.float32


def test_fedaws_classifier_key() -> None:
    ys = [make_state(1), make_state(2)]

    def replies() -> list[Message]:
        return [reply(y, train_metrics(1)) for y in ys]

    explicit, _ = FedAwS(classifier_key="conv.weight").aggregate_train(1, replies())
    np.testing.assert_allclose(
        explicit["fc.weight"].numpy(),
        weighted_mean([y["fc.weight"] for y in ys], [1, 1]),
        rtol=1e-6,
    )
    with pytest.raises(AggregationError, match="2-D"):
        FedAwS(classifier_key="fc.bias").aggregate_train(1, replies())


# ----------------------------------------------------------------- example strategy


def test_example_server_lr_strategy() -> None:
    strategy = make_strategy("strategies.example_custom:ServerLRFedAvg", **{"server-lr": 0.25})
    assert isinstance(strategy, ServerLRFedAvg) and strategy.server_lr == 0.25
    x, ys, ns = make_state(0), [make_state(1), make_state(2)], [1, 2]
    configure(strategy, x)
    arrays, _ = strategy.aggregate_train(
        1, [reply(y, train_metrics(n)) for y, n in zip(ys, ns, strict=True)]
    )
    for key in PARAM_KEYS:
        expected = x[key] + 0.25 * (weighted_mean([y[key] for y in ys], ns) - x[key])
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5)


# ------------------------------------------------------------------ metric aggregation


def eval_record(correct: list[int], count: list[int], loss: float) -> RecordDict:
    metrics = {
        "num-examples": sum(count),
        "correct-per-class": correct,
        "count-per-class": count,
        "eval-loss": loss,
    }
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_class_counts_are_summed_not_averaged() -> None:
    # Client A: only class 0, all right. Client B: classes 1 and 2, half right.
    a = eval_record([10, 0, 0], [10, 0, 0], loss=0.1)
    b = eval_record([0, 5, 0], [0, 10, 10], loss=1.0)
    out = aggregate_class_counts([a, b], "num-examples")
    assert out["correct-per-class"] == [10, 5, 0]
    assert out["count-per-class"] == [10, 10, 10]
    recalls = np.array([10 / 10, 5 / 10, 0 / 10])
    assert out["balanced-error"] == pytest.approx(1 - recalls.mean())
    assert out["accuracy"] == pytest.approx(15 / 30)
    assert out["eval-loss"] == pytest.approx((10 * 0.1 + 20 * 1.0) / 30)
    assert out["num-examples"] == 30
    mean_of_client_errors = np.mean([0.0, 1 - np.mean([0.5, 0.0])])
    assert out["balanced-error"] != pytest.approx(mean_of_client_errors)


def test_class_counts_reject_inconsistent_records() -> None:
    a = eval_record([1, 0], [1, 1], loss=0.0)
    b = eval_record([1, 0, 0], [1, 1, 1], loss=0.0)
    with pytest.raises(ValueError, match="classes"):
        aggregate_class_counts([a, b], "num-examples")


def test_train_metrics_skip_lists_and_partition_id() -> None:
    recs = [
        RecordDict(
            {
                "m": MetricRecord(
                    {"num-examples": 1, "train-loss": 2.0, "partition-id": 7, "hist": [1, 2]}
                )
            }
        ),
        RecordDict(
            {
                "m": MetricRecord(
                    {"num-examples": 3, "train-loss": 4.0, "partition-id": 9, "hist": [3, 4]}
                )
            }
        ),
    ]
    out = aggregate_train_metrics(recs, "num-examples")
    assert dict(out) == {"num-examples": 4, "train-loss": pytest.approx((2.0 + 12.0) / 4)}


# ------------------------------------------------------------------------- registry


def test_registry_lists_all_strategies() -> None:
    expected = {
        "fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "fedmedian",
        "fedtrimmedavg", "krum", "qfedavg", "scaffold", "fednova", "fedaws", "feddyn",
    }  # fmt: skip
    assert set(list_strategies()) == expected


@pytest.mark.parametrize("name", sorted(set(list_strategies()) - {"qfedavg"}))
def test_every_registered_strategy_builds(name: str) -> None:
    strategy = make_strategy(name, fraction_train=0.5, min_train_nodes=3)
    assert isinstance(strategy, Strategy)
    assert strategy.fraction_train == 0.5 and strategy.min_train_nodes == 3
    assert strategy.fraction_evaluate == 0.0
    assert strategy.evaluate_metrics_aggr_fn is aggregate_class_counts


def test_qfedavg_needs_client_lr_and_reads_our_loss_key() -> None:
    with pytest.raises(ValueError, match=r"requires strategy\.client-learning-rate"):
        make_strategy("qfedavg")
    strategy = make_strategy("qfedavg", client_learning_rate=0.1)
    assert strategy.train_loss_key == "train-loss"
    floats = [{k: v for k, v in make_state(i).items() if k in PARAM_KEYS} for i in (0, 1, 2)]
    configure(strategy, floats[0])
    arrays, _ = strategy.aggregate_train(1, [reply(y, train_metrics(2)) for y in floats[1:]])
    assert arrays is not None
    assert strategy_params("qfedavg")["train_loss_key"] == "train-loss"


@pytest.mark.xfail(
    strict=True,
    reason="flwr 1.42 QFedAvg updates arrays in place and "
    "cannot hold a float step in an integer buffer (num_batches_tracked)",
)
def test_qfedavg_with_integer_buffers() -> None:
    strategy = make_strategy("qfedavg", client_learning_rate=0.1)
    configure(strategy, make_state(0))
    strategy.aggregate_train(1, [reply(make_state(i), train_metrics(2)) for i in (1, 2)])


def test_registry_errors() -> None:
    with pytest.raises(RegistryError, match="did you mean 'fedavg'"):
        make_strategy("fedavgg")
    with pytest.raises(RegistryError, match="cannot import module"):
        make_strategy("no_such_pkg.mod:Thing")
    with pytest.raises(RegistryError, match="not a subclass"):
        make_strategy("fedimb.registry:Registry")
    with pytest.raises(
        ValueError, match=r"unknown parameter 'proximal_mu'.*accepted: .*server_momentum"
    ):
        make_strategy("fedavgm", proximal_mu=0.1)
    with pytest.raises(ValueError, match="unknown parameter 'server_lr'"):
        make_strategy("fedaws", server_lr=1.0)


def test_strategy_params_follow_kwargs_to_fedavg() -> None:
    params = strategy_params("fedaws")
    assert params["spreadout_steps"] == 10 and params["fraction_evaluate"] == 0.0
    assert "train_metrics_aggr_fn" not in params
    custom = strategy_params("strategies.example_custom:ServerLRFedAvg")
    assert custom["server_lr"] == 1.0 and "min_train_nodes" in custom


def test_make_strategy_can_enable_federated_evaluation() -> None:
    strategy = make_strategy("fedavg", fraction_evaluate=1.0, min_evaluate_nodes=2)
    assert strategy.fraction_evaluate == 1.0 and strategy.min_evaluate_nodes == 2


# ------------------------------------------------------------------------ pickling


def test_pickled_scaffold_keeps_control_variate() -> None:
    strategy = make_strategy("scaffold")  # with our module-level metric functions
    configure(strategy, make_state(0))
    deltas = {k: np.full(SHAPES[k], 2.0, dtype=np.float32) for k in PARAM_KEYS}
    strategy.aggregate_train(
        1,
        [
            reply(make_state(i), train_metrics(1), {SCAFFOLD_DELTA_KEY: to_record(deltas)})
            for i in (1, 2)
        ],
    )
    restored = pickle.loads(pickle.dumps(strategy))
    for key in PARAM_KEYS:
        np.testing.assert_array_equal(restored.control[key], strategy.control[key])
        assert restored.control[key].any()


def test_pickled_fedadam_continues_identically() -> None:
    original = FedAdam()
    x = make_state(0)
    del x["bn.num_batches_tracked"]

    def round_(strategy: FedAdam, rnd: int, start: dict) -> dict:
        configure(strategy, start, rnd)
        ys = [{k: v for k, v in make_state(10 * rnd + i).items() if k in start} for i in (1, 2)]
        arrays, _ = strategy.aggregate_train(rnd, [reply(y, train_metrics(1)) for y in ys])
        return to_numpy(arrays)

    x1 = round_(original, 1, x)
    restored = pickle.loads(pickle.dumps(original))
    for key in x:
        np.testing.assert_array_equal(restored.m_t[key], original.m_t[key])
    a, b = round_(original, 2, x1), round_(restored, 2, x1)
    for key in x:
        np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------- Flower's FedAvg family, torch's mean

# Registered name -> Flower's class; ours must give its results bit for bit.
FLOWER_FEDAVG_FAMILY = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def mixed_state(seed: int) -> dict[str, np.ndarray]:
    """Small and large (torch-summed) float32 weights, small and large float64 buffers."""
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items() if k in PARAM_KEYS}
    state["big.weight"] = rng.normal(size=(2 * stock._TORCH_MIN_SIZE, 2)).astype(np.float32)
    state["bn.running_var"] = rng.random(4)  # float64
    state["big.running_var"] = rng.random(stock._TORCH_MIN_SIZE)
    state["bn.num_batches_tracked"] = np.array(seed, dtype=np.int64)  # 0-d: a float64 mean
    state["scale"] = np.array(rng.normal(), dtype=np.float32)  # 0-d float32
    return state


def in_process_reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    """A reply as the in-process engine builds it: TensorArrays, no .npy bytes."""
    instruction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    record = state_record({k: torch.from_numpy(v) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord(train_metrics(n))})
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("name", sorted(FLOWER_FEDAVG_FAMILY))
@pytest.mark.parametrize("make_reply", ["plain", "in-process"])
def test_registered_fedavg_family_equals_flower_bit_for_bit(
    name: str, make_reply: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flower_cls = FLOWER_FEDAVG_FAMILY[name]
    calls = []
    monkeypatch.setattr(
        stock, "weighted_array_mean", lambda *a: calls.append(a) or weighted_array_mean(*a)
    )
    ours = make_strategy(name)
    assert isinstance(ours, flower_cls) and type(ours).__name__ == flower_cls.__name__
    flower = flower_cls(**{k: getattr(ours, k) for k in ("fraction_evaluate",)})
    flower.train_metrics_aggr_fn = ours.train_metrics_aggr_fn
    build = (lambda y, n: reply(y, train_metrics(n))) if make_reply == "plain" else in_process_reply
    x = mixed_state(0)
    for rnd in (1, 2):  # a second round exercises FedAvgM's and FedOpt's server state
        results = []
        for strategy in (ours, flower):
            configure(strategy, x, rnd)
            replies = [build(mixed_state(10 * rnd + i), n) for i, n in enumerate((37, 5, 101))]
            arrays, metrics = strategy.aggregate_train(rnd, replies)
            arrays.to_torch_state_dict()  # as the server reads the global model
            results.append((to_numpy(arrays), dict(metrics)))
        (a, metrics_a), (b, metrics_b) = results
        assert metrics_a == metrics_b
        for key in x:
            assert isinstance(a[key], np.ndarray) and a[key].shape == b[key].shape
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
        x = a
    assert len(calls) == 2  # the mean above, not Flower's


def test_weighted_array_mean_equals_flower_for_integer_buffers_and_odd_arrays() -> None:
    """Dtypes torch would round or promote differently fall back to numpy's expression."""
    states = [make_state(i) for i in (1, 2, 3)]  # with an int64 buffer: float64 mean
    rng, big = np.random.default_rng(7), 2 * stock._TORCH_MIN_SIZE
    for i, state in enumerate(states):
        state["half"] = rng.normal(size=big).astype(np.float16)
        state["counts"] = rng.integers(0, 1000, size=big)  # int64: numpy's mean is float64
        # Large, so summed by torch until the float64 term; numpy adds that in float64.
        state["mixed"] = rng.normal(size=big).astype(np.float64 if i else np.float32)
    contents = [RecordDict({"a": to_record(s), "m": MetricRecord({"n": 3 + i})}) for i, s in
                enumerate(states)]  # fmt: skip
    ours = to_numpy(weighted_array_mean(contents, "n"))
    flower = to_numpy(aggregate_arrayrecords(contents, "n"))
    assert ours.keys() == flower.keys()
    for key, want in flower.items():
        assert ours[key].dtype == want.dtype
        np.testing.assert_array_equal(ours[key], want)


def test_weighted_array_mean_weights_huge_integer_counts_as_flower_does() -> None:
    """Flower divides the integer counts by their integer sum; floats would round 2**53 + 2."""
    states = [{"w": np.full(4, float(i + 1))} for i in range(3)]
    contents = [RecordDict({"a": to_record(s), "m": MetricRecord({"n": n})})
                for s, n in zip(states, [2**53, 1, 1], strict=True)]  # fmt: skip
    ours = weighted_array_mean(contents, "n")["w"].numpy()
    np.testing.assert_array_equal(ours, aggregate_arrayrecords(contents, "n")["w"].numpy())


def test_weighted_array_mean_of_reversed_views_equals_flower() -> None:
    """torch cannot view an array with a negative stride: such arrays take numpy's path."""
    rng = np.random.default_rng(3)
    big = 2 * stock._TORCH_MIN_SIZE
    views = [rng.normal(size=big).astype(np.float32)[::-1] for _ in range(3)]
    for order in (views, [np.ascontiguousarray(views[0]), *views[1:]]):
        contents = []
        for i, v in enumerate(order):
            record = ArrayRecord()  # ArrayRecord({...}) would make plain Arrays of them
            record["w"] = TensorArray(v)
            contents.append(RecordDict({"a": record, "m": MetricRecord({"n": 2 + i})}))
        want = aggregate_arrayrecords(contents, "n")["w"].numpy()
        np.testing.assert_array_equal(weighted_array_mean(contents, "n")["w"].numpy(), want)


def test_weighted_array_mean_reads_large_arrays_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large arrays (a CNN's dense layer) are not copied: not from an in-process reply's
    host array, nor from a plain Array's .npy bytes."""
    large = [{k: v for k, v in mixed_state(i).items() if k.startswith("big")} for i in range(3)]
    replies = [in_process_reply(state, 2 + i) for i, state in enumerate(large)]
    want = to_numpy(aggregate_arrayrecords([r.content for r in replies], "num-examples"))

    def no_copies(self: TensorArray) -> np.ndarray:
        raise AssertionError("copied a reply's values")

    plain_contents = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: a.as_array() for k, a in r.content["arrays"].items()}),
                "metrics": r.content["metrics"],
            }
        )
        for r in replies
    ]
    monkeypatch.setattr(TensorArray, "numpy", no_copies)
    monkeypatch.setattr(Array, "numpy", no_copies)
    mean = weighted_array_mean([r.content for r in replies], "num-examples")
    plain = weighted_array_mean(plain_contents, "num-examples")
    monkeypatch.undo()
    for key, values in want.items():
        np.testing.assert_array_equal(mean[key].numpy(), values)
        np.testing.assert_array_equal(plain[key].numpy(), values)


# ------------------------------------------------------------------ through start()


class LoopbackGrid(FakeGrid):
    """Answers each train instruction like a SCAFFOLD client that moves by -0.1."""

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            x = to_numpy(msg.content["arrays"])
            control = msg.content[SCAFFOLD_CONTROL_KEY]  # the client must receive c
            y = {k: (v - 0.1).astype(v.dtype) if k in control else v for k, v in x.items()}
            delta = {k: np.ones_like(a.numpy()) for k, a in control.items()}
            content = RecordDict(
                {
                    "arrays": to_record(y),
                    "metrics": MetricRecord(train_metrics(2)),
                    SCAFFOLD_DELTA_KEY: to_record(delta),
                }
            )
            replies.append(Message(content, reply_to=msg))
        return replies


def test_scaffold_runs_through_flower_start() -> None:
    strategy = make_strategy("scaffold", param_keys=PARAM_KEYS)
    x = make_state(0)
    result = strategy.start(LoopbackGrid(3), to_record(x), num_rounds=2)
    final = to_numpy(result.arrays)
    np.testing.assert_allclose(final["fc.weight"], x["fc.weight"] - 0.2, rtol=1e-5)
    # Each round: c += (3/3) * mean(ones) -> 2 after two rounds.
    np.testing.assert_allclose(strategy.control["fc.bias"], 2.0 * np.ones(4))
    assert result.train_metrics_clientapp[2]["num-examples"] == 6
