"""Server-side reply checks (what is left out of aggregation, and why) and node order."""

import random
import threading
import time

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from clients.app import app
from fedimb.engines.inprocess_grid import InProcessGrid, task_identity
from fedimb.protocol import STATE_PREFIX
from fedimb.results import RunRecorder
from fedimb.server import (
    GuardedGrid,
    ServerStop,
    SimulationEnded,
    StrategyHooks,
)
from fedimb.server.replies import float_view


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        np.full((), 3.0),
        np.array([1.0, np.nan, 2.0], dtype=np.float16),
        np.asfortranarray(np.random.default_rng(1).normal(size=(5, 2))),
        np.array([np.inf], dtype=np.float64),
    ],
)
def test_float_view_reads_the_serialised_values_in_place(array):
    view = float_view(Array(array))
    assert view.size == array.size
    assert np.isfinite(view).all() == np.isfinite(array).all()
    np.testing.assert_array_equal(np.sort(view.ravel()), np.sort(array.ravel()))


def test_float_view_skips_integer_arrays():
    assert float_view(Array(np.arange(4))) is None


class RandomIdGrid:
    """Flower's Ray engine in miniature: random node ids, listed in no particular order,
    and a node's partition known only to the node (its ClientApp is fedimb's own)."""

    def __init__(self, seed: int, num_nodes: int = 8) -> None:
        self.engine, self.seed = InProcessGrid(app, num_nodes, batched=False), seed
        rng = np.random.default_rng(seed)
        ids = rng.choice(2**40, size=num_nodes, replace=False)
        self.engine.contexts = dict(zip(map(int, ids), self.engine.contexts.values(), strict=True))
        self.listing = [int(i) for i in rng.permutation(ids)]
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.listing)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += messages
        for _ in range(self.seed):
            random.random()  # as Ray's driver threads draw from `random` meanwhile
        return self.engine.send_and_receive(messages, timeout=timeout)


@pytest.fixture(autouse=True)
def as_server():
    with task_identity(run_id=1):  # what Flower sets in a ServerApp: Messages need it
        yield


def guarded(inner, tmp_path):
    recorder = RunRecorder(tmp_path, seed=0, num_rounds=1)
    return GuardedGrid(inner, recorder, max_failure_fraction=0.5, client_timeout=0.0)


def partitions(inner, nodes):
    return [int(inner.engine.contexts[n].node_config["partition-id"]) for n in nodes]


def test_nodes_are_listed_in_partition_order_after_one_query_each(tmp_path):
    inner = RandomIdGrid(seed=1)
    grid = guarded(inner, tmp_path)
    nodes = grid.get_node_ids()
    assert partitions(inner, nodes) == list(range(8))
    assert sorted(nodes) == sorted(inner.listing)
    assert [m.metadata.message_type for m in inner.sent] == [MessageType.QUERY] * 8
    assert grid.get_node_ids() == nodes and len(inner.sent) == 8  # asked once per node


def test_seeded_sampling_picks_the_same_partitions_whatever_the_node_ids(tmp_path):
    picked = []
    for seed in (1, 2):
        inner = RandomIdGrid(seed)
        random.seed(0)
        picked.append(partitions(inner, random.sample(guarded(inner, tmp_path).get_node_ids(), 3)))
    assert picked[0] == picked[1]


def test_a_node_that_cannot_say_its_partition_is_listed_last_and_asked_once(tmp_path, caplog):
    inner = RandomIdGrid(seed=3)
    mute = inner.listing[0]
    del inner.engine.contexts[mute].node_config["partition-id"]  # its query reply is an error
    grid = guarded(inner, tmp_path)
    nodes = grid.get_node_ids()
    assert nodes[-1] == mute and len(nodes) == 8
    assert "1 node(s) did not say their partition id" in caplog.text
    grid.get_node_ids()
    assert len(inner.sent) == 8


def test_the_inprocess_engine_is_not_queried(tmp_path):
    engine = InProcessGrid(app, 5, batched=False)
    grid = guarded(engine, tmp_path)
    engine.send_and_receive = None  # any query would fail here
    assert grid.get_node_ids() == engine.get_node_ids()


def hooked(strategy, offset, *, seed):
    """``strategy`` with fedimb's hooks, as run_server gives it (after evaluate_fn(0))."""
    hooks = StrategyHooks("fedavg", offset, seed=seed)
    hooks.evaluate_called = True
    return hooks.attach(strategy)


def sampled_partitions(driver, server_round, inner, tmp_path, stage="train"):
    configure = getattr(driver, f"configure_{stage}")
    messages = configure(server_round, ArrayRecord(), ConfigRecord(), guarded(inner, tmp_path))
    return partitions(inner, [m.metadata.dst_node_id for m in messages])


def test_each_rounds_sample_depends_on_the_seed_and_round_only(tmp_path):
    def driver(offset=0, seed=0):
        return hooked(FedAvg(fraction_train=0.5), offset, seed=seed)

    # Other draws from `random` (here: during the grid's first query) change nothing.
    first = sampled_partitions(driver(), 1, RandomIdGrid(seed=1), tmp_path)
    assert sampled_partitions(driver(), 1, RandomIdGrid(seed=5), tmp_path) == first
    assert len(first) == 4
    # A resumed run (offset 1) samples its round 1 as an uninterrupted run's round 2.
    inner = RandomIdGrid(seed=2)
    second = sampled_partitions(driver(), 2, inner, tmp_path)
    assert sampled_partitions(driver(offset=1), 1, inner, tmp_path) == second
    rounds = [sampled_partitions(driver(), r, inner, tmp_path) for r in range(1, 6)]
    assert len({tuple(p) for p in rounds}) > 1  # not the same clients every round
    assert sampled_partitions(driver(seed=1), 1, inner, tmp_path) != first or (
        sampled_partitions(driver(seed=2), 1, inner, tmp_path) != first
    )


def test_the_evaluation_sample_is_seeded_too_and_apart_from_the_train_sample(tmp_path):
    driver = hooked(FedAvg(fraction_train=0.5, fraction_evaluate=0.5), 0, seed=0)
    evaluated = sampled_partitions(driver, 1, RandomIdGrid(seed=1), tmp_path, "evaluate")
    assert len(evaluated) == 4
    assert sampled_partitions(driver, 1, RandomIdGrid(seed=5), tmp_path, "evaluate") == evaluated
    # Its own key: not the clients that trained in the same round.
    assert sampled_partitions(driver, 1, RandomIdGrid(seed=1), tmp_path) != evaluated


class CountingGrid(RandomIdGrid):
    """Its clients answer train messages themselves: each counts its train rounds in its
    persistent state and sends the count with its reply, as fedimb's clients do."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages[0].metadata.message_type != MessageType.TRAIN:
            return super().send_and_receive(messages, timeout=timeout)
        self.sent += messages
        replies = []
        for msg in messages:
            ctx = self.engine.contexts[msg.metadata.dst_node_id]
            seen = ctx.state.get("count", ArrayRecord({"n": torch.zeros(1)}))
            ctx.state["count"] = ArrayRecord({"n": seen.to_torch_state_dict()["n"] + 1})
            pid = int(ctx.node_config["partition-id"])
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.ones(2)}),
                    "metrics": MetricRecord({"partition-id": pid, "num-examples": 1}),
                    STATE_PREFIX + "count": ctx.state["count"],
                }
            )
            replies.append(Message(content, reply_to=msg))
        return replies


def train_round(grid, server_round, pids):
    node_of = {grid.partition_of[n]: n for n in grid.get_node_ids()}
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return grid.send_and_receive([Message(content, node_of[p], MessageType.TRAIN) for p in pids])


def counts(inner):
    return {
        int(ctx.node_config["partition-id"]): int(ctx.state["count"]["n"].numpy()[0])
        for ctx in inner.engine.contexts.values()
        if "count" in ctx.state
    }


def test_client_state_leaves_the_replies_and_goes_back_to_the_clients_on_resume(tmp_path, caplog):
    grid = guarded(CountingGrid(seed=1), tmp_path)
    train_round(grid, 1, [0, 1, 2])
    replies = train_round(grid, 2, [1, 2, 3])
    assert all(set(r.content) == {"arrays", "metrics"} for r in replies)  # as a strategy expects
    saved = grid.client_state()
    assert {p: int(s["count"]["n"][0]) for p, s in saved.items()} == {0: 1, 1: 2, 2: 2, 3: 1}

    # Resumed: other node ids, fresh contexts; each client gets its state back once,
    # before the first train round, whether or not that round samples it.
    inner = CountingGrid(seed=2)
    mute = next(n for n, c in inner.engine.contexts.items() if c.node_config["partition-id"] == 3)
    grid = guarded(inner, tmp_path)
    grid.get_node_ids()
    inner.engine.contexts[mute].node_config["partition-id"] = "x"  # its restore query fails
    grid.restore_client_state(saved)
    assert counts(inner) == {}
    inner.sent.clear()
    train_round(grid, 3, [1, 5])
    assert [m.metadata.message_type for m in inner.sent] == [MessageType.QUERY] * 4 + [
        MessageType.TRAIN
    ] * 2
    assert counts(inner) == {0: 1, 1: 3, 2: 2, 5: 1}
    assert "saved state of 1 client(s) could not be handed back (partitions 3)" in caplog.text
    assert {p: int(s["count"]["n"][0]) for p, s in grid.client_state().items()} == {
        0: 1,
        1: 3,
        2: 2,
        3: 1,
        5: 1,
    }
    inner.sent.clear()
    train_round(grid, 4, [0])
    assert [m.metadata.message_type for m in inner.sent] == [MessageType.TRAIN]


class PollingGrid(RandomIdGrid):
    """Flower's Ray engine as the server sees it: replies are pulled, at most 4 per pull
    here, and those of ``mute`` nodes never come."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.mute, self.ready, self.pulls = frozenset(), [], 0

    def push_messages(self, messages):
        messages = list(messages)
        ids = self.engine.push_messages(
            m for m in messages if m.metadata.dst_node_id not in self.mute
        )
        self.ready += self.engine.pull_messages(ids)
        return ids + [f"lost-{i}" for i in range(len(messages) - len(ids))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        pulled, self.ready = self.ready[:4], self.ready[4:]
        return pulled


def polling(inner, tmp_path, stop):
    recorder = RunRecorder(tmp_path, seed=0, num_rounds=1)
    return GuardedGrid(inner, recorder, max_failure_fraction=1.0, client_timeout=0.0, stop=stop)


def test_with_a_stop_event_replies_are_polled_and_stop_interrupts_the_wait(tmp_path):
    stop = ServerStop()
    inner = PollingGrid(seed=1)
    grid = polling(inner, tmp_path, stop)
    nodes = grid.get_node_ids()  # 8 queries, answered over 2 pulls
    assert partitions(inner, nodes) == list(range(8)) and inner.pulls == 2

    def queries():
        return [
            Message(RecordDict({"config": ConfigRecord({})}), n, MessageType.QUERY) for n in nodes
        ]

    # A silent node: the wait ends at the timeout, with the others' replies...
    inner.mute = frozenset(nodes[:1])
    t0 = time.monotonic()
    replies = grid.send_and_receive(queries(), timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(nodes[1:])

    # ...and setting the stop event ends it at once, in the waiting thread.
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        grid.send_and_receive(queries(), timeout=60)
    assert time.monotonic() - t0 < 1

    # A runtime that stopped fails the run with its cause; an interruption stays one.
    failed = ServerStop()
    try:
        raise RuntimeError("Ending simulation.") from ValueError("ActorPool is empty")
    except RuntimeError as exc:
        failed.fail(exc)
    stop.fail(RuntimeError("after the interrupt"))
    assert stop.cause is None
    with pytest.raises(SimulationEnded, match="stopped: ValueError: ActorPool is empty"):
        polling(inner, tmp_path, failed).send_and_receive(queries(), timeout=60)
