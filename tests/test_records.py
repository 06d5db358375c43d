"""Replies backed by host tensors behave as Flower Arrays, and cost no serialisation."""

import copy
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedimb.batched import train_clients
from fedimb.config import load_config
from fedimb.engines.inprocess_grid import task_identity
from fedimb.losses import make_loss
from fedimb.models import build_model
from fedimb.records import TensorArray, state_record, values_view
from fedimb.server.replies import reply_fault
from fedimb.sim import run_experiment
from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan


def test_a_tensor_array_is_the_equal_flower_array():
    values = torch.randn(3, 4)
    lazy, plain = TensorArray(values), Array(values.numpy())
    assert "data" not in lazy.__dict__  # nothing serialised yet
    assert lazy == plain and plain == lazy
    assert lazy.object_id == plain.object_id  # the same bytes on Flower's wire
    assert lazy.data == plain.data
    for clone in (pickle.loads(pickle.dumps(lazy)), copy.deepcopy(lazy)):
        assert type(clone) is Array and clone == plain


def test_numpy_returns_a_private_copy():
    values = torch.arange(6, dtype=torch.float32)
    array = TensorArray(values)
    first = array.numpy()
    first[:] = -1  # a strategy may change what numpy() returned
    np.testing.assert_array_equal(array.numpy(), values.numpy())
    with pytest.raises(ValueError):
        array.values()[0] = 5  # the backing values are read-only


def test_replacing_the_bytes_drops_the_backing_values():
    array = TensorArray(torch.ones(4), finite=True)
    array.data = Array(np.zeros(4, dtype=np.float32)).data
    assert array.values() is None and not array.known_finite
    np.testing.assert_array_equal(array.numpy(), np.zeros(4, dtype=np.float32))
    reshaped = TensorArray(torch.arange(4.0))
    reshaped.shape = (2, 2)  # metadata changed: the bytes made first are kept
    assert reshaped.values() is None and reshaped.data == Array(np.arange(4.0, dtype="f4")).data


def test_state_record_keeps_tensor_arrays():
    record = state_record({"w": torch.randn(2, 2), "n": torch.tensor(3)}, finite=True)
    assert all(isinstance(a, TensorArray) and a.known_finite for a in record.values())
    assert torch.equal(record.to_torch_state_dict()["n"], torch.tensor(3))
    assert not any("data" in a.__dict__ for a in record.values())


def _reply(record: ArrayRecord) -> Message:
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"train-loss": 0.5})})
    with task_identity(1):
        return Message(content, dst_node_id=1, message_type="train")


def test_the_guard_trusts_only_a_device_check_of_the_same_values():
    bad = torch.tensor([1.0, float("nan")])
    assert "non-finite" in reply_fault(_reply(state_record({"w": bad})), 0.0)
    # A finite flag is only trusted while the values it was computed for are there.
    flagged = state_record({"w": bad}, finite=True)
    assert reply_fault(_reply(flagged), 0.0) is None  # trusted, as documented
    flagged["w"].data = Array(bad.numpy()).data
    assert "non-finite" in reply_fault(_reply(flagged), 0.0)


def test_batched_training_reports_which_clients_stayed_finite():
    torch.manual_seed(0)
    model = build_model("mlp", (6,), 3, hidden=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(batch_size=4, lr=0.1)
    jobs = []
    for pid in range(3):
        x = torch.randn(8, 6)
        if pid == 1:
            x[0, 0] = float("inf")  # one poisoned sample: this client's weights go NaN
        y = torch.tensor([pid % 3, (pid + 1) % 3] * 4)
        plan = make_plan(y.numpy(), settings, client_rng(0, 1, pid))
        jobs.append(ClientJob(x, y, make_loss("ce", np.bincount(y.numpy(), minlength=3)), plan))
    results = train_clients(model, state, jobs, lambda x: x, settings)
    assert [r.finite for r in results] == [True, False, True]
    assert not all(torch.isfinite(v).all() for v in results[1].state.values())


@pytest.mark.slow
def test_an_inprocess_round_serialises_no_reply(tmp_path, monkeypatch):
    """The point of TensorArray: replies reach FedAvg without ``.npy`` bytes."""
    built = []
    original = TensorArray.__getattr__

    def counting(self, name):
        if name == "data":
            built.append(self.shape)
        return original(self, name)

    monkeypatch.setattr(TensorArray, "__getattr__", counting)
    config = load_config(
        overrides={
            "num-clients": 6,
            "num-rounds": 2,
            "engine": "inprocess",
            "batched": "on",
            "strategy.min-train-clients": 6,
            "checkpoint-every": 1,
        }
    )
    run_experiment(config, tmp_path, progress=False)
    # Only the final global model's bytes are built (Flower's closing summary prints its
    # size): each shape once, where any round's six replies would repeat every shape.
    assert built and len(built) == len(set(built))
    assert (tmp_path / "summary.json").exists()


def test_record_of_finds_records_by_kind_without_cyclic_views():
    import gc

    from flwr.app import ConfigRecord

    from fedimb.records import record_of

    metrics = MetricRecord({"num-examples": 3})
    content = RecordDict({"metrics": metrics, "config": ConfigRecord({"lr": 0.1})})
    assert record_of(content, "metrics", MetricRecord) is metrics
    assert record_of(content, "config", MetricRecord) is None  # another kind
    assert record_of(content, "arrays", ArrayRecord) is None  # absent
    enabled = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        for _ in range(5):
            record_of(content, "metrics", MetricRecord)
        assert gc.collect() == 0
        for _ in range(5):
            content.metric_records.get("metrics")  # Flower's view: cyclic garbage
        assert gc.collect() > 0
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        np.asfortranarray(np.random.default_rng(1).normal(size=(5, 2))),
        np.full((), 3.0),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([True, False]),
        np.array([1.5, np.nan], dtype=np.float16),
    ],
)
def test_values_view_reads_an_array_in_place(values):
    plain, lazy = Array(values), TensorArray(values.copy())
    for array in (plain, lazy):
        view = values_view(array)
        assert view.dtype == values.dtype and view.shape == values.shape
        np.testing.assert_array_equal(view, values)
        assert not view.flags.writeable  # shared with the reply: never written through
    # No copies: the plain Array's view lies in its .npy bytes, the TensorArray's is its own.
    if values.size:
        assert np.shares_memory(values_view(plain), np.frombuffer(plain.data, np.uint8))
        assert np.shares_memory(values_view(lazy), lazy.values())
