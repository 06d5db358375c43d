"""The in-process engine is a real Flower Grid: stock strategies run on it unchanged."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedimb.engines.inprocess_grid import InProcessGrid, task_identity


def test_task_identity_is_set_for_the_run_and_restored():
    # Guards the one private Flower module we touch (flwr is pinned to 1.42.*).
    before = TaskIdentity._run_id
    with task_identity(1234):
        assert TaskIdentity.run_id == 1234
        Message(RecordDict(), 7, "train")  # building a Message needs the identity
    assert TaskIdentity._run_id == before


def _mean_client():
    """A ClientApp whose update is known: it adds (partition id + 1) to every weight."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        pid = context.node_config["partition-id"]
        arrays = {k: Array(a.numpy() + pid + 1) for k, a in msg.content["arrays"].items()}
        seen = context.state.config_records.get("seen", ConfigRecord({"rounds": 0}))
        context.state["seen"] = ConfigRecord({"rounds": seen["rounds"] + 1})
        metrics = MetricRecord({"num-examples": pid + 1})
        return Message(
            RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg
        )

    return app


def test_stock_fedavg_runs_on_the_inprocess_grid():
    app = _mean_client()
    grid = InProcessGrid(app, num_nodes=4, batched=False)
    start = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    with task_identity(grid.run.run_id):
        result = FedAvg(fraction_evaluate=0.0, min_available_nodes=4).start(
            grid=grid, initial_arrays=start, num_rounds=2
        )
    # Weighted by num-examples = pid + 1: each round adds sum((p+1)^2) / sum(p+1) = 30 / 10.
    np.testing.assert_allclose(result.arrays["w"].numpy(), np.full(3, 6.0))
    # Each node kept its own Context across rounds, as under Flower's simulation engine.
    assert [c.state["seen"]["rounds"] for c in grid.contexts.values()] == [2, 2, 2, 2]
    assert sorted(c.node_config["partition-id"] for c in grid.contexts.values()) == [0, 1, 2, 3]


def test_a_raising_client_becomes_an_error_reply():
    app = ClientApp()

    @app.train()
    def train(msg, context):
        raise RuntimeError("boom")

    grid = InProcessGrid(app, num_nodes=2, batched=False)
    with task_identity(grid.run.run_id):
        msgs = [Message(RecordDict(), node, "train") for node in grid.get_node_ids()]
        replies = grid.send_and_receive(msgs)
    assert len(replies) == 2 and all(r.has_error() for r in replies)
    assert "boom" in replies[0].error.reason


def test_pull_returns_each_reply_once():
    app = _mean_client()
    grid = InProcessGrid(app, num_nodes=3, batched=False)
    with task_identity(grid.run.run_id):
        msg = Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})}),
            grid.get_node_ids()[0],
            "train",
        )
        ids = grid.push_messages([msg])
        assert len(grid.pull_messages(ids)) == 1
        assert grid.pull_messages(ids) == []


def test_clients_sent_different_models_are_trained_from_their_own():
    # A strategy may send different weights to different clients: each group of clients
    # that received the same record trains from it, batched or not.
    import torch
    from flwr.app import Context

    from fedimb.client import experiment_record, handle_train, train_replies
    from fedimb.config import load_config
    from fedimb.federation import get_federation, init_model

    config = load_config(overrides={"num-clients": 4, "engine": "inprocess", "num-rounds": 2})
    model = init_model(config, get_federation(config))
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    state_b = {k: v + 0.1 for k, v in state_a.items()}
    record = experiment_record(config)
    record["server-round"] = 1
    contexts = [
        Context(run_id=1, node_id=10 + i, node_config={"partition-id": i, "num-partitions": 4},
                state=RecordDict(), run_config={})
        for i in range(4)
    ]  # fmt: skip
    with task_identity(1):
        content_a = RecordDict({"arrays": ArrayRecord(state_a), "config": record})
        content_b = RecordDict({"arrays": ArrayRecord(state_b), "config": record})
        msgs = [Message(c, 10 + i, "train") for i, c in
                enumerate([content_a, content_b, content_a, content_b])]  # fmt: skip
        together = train_replies(msgs, contexts)
        alone = [handle_train(m, c) for m, c in zip(msgs, contexts, strict=True)]
    for a, b in zip(together, alone, strict=True):
        wa = a.content["arrays"].to_torch_state_dict()
        wb = b.content["arrays"].to_torch_state_dict()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    first = together[0].content["arrays"].to_torch_state_dict()
    second = together[1].content["arrays"].to_torch_state_dict()
    assert not torch.allclose(first["1.weight"], second["1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("collect_above", [0, None])
def test_replies_are_freed_once_the_strategy_is_done(tmp_path, monkeypatch, collect_above):
    """Flower's record views keep every reply in a reference cycle: without the engine's
    collection before a train round, old replies (the clients' weights) stay alive
    until Python's cyclic collector runs (disabled here to make that deterministic)."""
    import gc
    import weakref

    from fedimb.config import load_config
    from fedimb.engines import inprocess_grid
    from fedimb.records import TensorArray
    from fedimb.sim import run_experiment

    limit = collect_above if collect_above is not None else float("inf")
    monkeypatch.setattr(inprocess_grid, "COLLECT_ABOVE_BYTES", limit)
    made: dict[int, list] = {}
    current = [1]
    init = TensorArray.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.setdefault(current[0], []).append(weakref.ref(self))

    monkeypatch.setattr(TensorArray, "__init__", tracked)
    alive_at_end = {}

    def on_round(server_round, row):
        current[0] = server_round + 1  # arrays made from now on belong to the next round
        if server_round == 3:
            alive_at_end.update({r: sum(w() is not None for w in refs) for r, refs in made.items()})

    config = load_config(
        None,
        {
            "dataset": "digits",
            "num-clients": 6,
            "num-rounds": 3,
            "engine": "inprocess",
            "device": "cpu",
            "checkpoint-every": 0,
            "strategy.min-train-clients": 6,
        },
    )
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        run_experiment(config, tmp_path, progress=False, on_round=on_round)
    finally:
        if enabled:
            gc.enable()
    assert set(alive_at_end) == {1, 2, 3} and alive_at_end[3] > 0  # round 3's are in use
    if collect_above == 0:
        assert alive_at_end[1] == 0  # freed before round 3 trained
    else:
        assert alive_at_end[1] > 0  # the cycle is real: only a collection frees them


def test_start_up_objects_are_frozen_for_the_run_only():
    """Collections during a run skip what was alive at its start; afterwards the
    collector sees everything again, and a process that froze objects itself is left as is."""
    import gc

    from fedimb.engines.inprocess_grid import frozen_start_up

    assert gc.get_freeze_count() == 0
    start_up = [object()]  # noqa: F841  # alive at the start: frozen
    with frozen_start_up(vectorised=False):
        frozen = gc.get_freeze_count()
        assert frozen > 0
        cycle = [None]
        cycle[0] = cycle  # made during the run: still collectable
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        owned = gc.get_freeze_count()
        with frozen_start_up(vectorised=True):
            assert gc.get_freeze_count() == owned
        assert gc.get_freeze_count() == owned
    finally:
        gc.unfreeze()


@pytest.mark.slow
def test_a_vectorised_run_collects_only_what_it_made(tmp_path):
    """In a fresh process (torch._dynamo not yet imported), the objects a collection
    visits during a vectorised run are those the run made, not torch's and Flower's
    (over 300,000 with torch._dynamo, which torch.func's first gradient imports)."""
    import json
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import gc, json, sys
        from fedimb.config import load_config
        from fedimb.sim import run_experiment
        assert "torch._dynamo" not in sys.modules
        seen = []
        config = load_config(None, {{
            "dataset": "digits", "num-clients": 4, "num-rounds": 2, "engine": "inprocess",
            "device": "cpu", "batched": "on", "checkpoint-every": 0,
            "strategy.min-train-clients": 4,
        }})
        run_experiment(config, {str(tmp_path)!r}, progress=False,
                       on_round=lambda r, row: seen.append(len(gc.get_objects())))
        print(json.dumps({{"visited": seen, "tracked_after": len(gc.get_objects())}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["visited"]) == 3  # rounds 0, 1, 2
    assert max(result["visited"]) < 50_000
    assert result["tracked_after"] > 300_000  # unfrozen again once the run is over
