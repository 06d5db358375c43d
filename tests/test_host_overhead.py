"""The per-client host work's shortcuts give what the long way gives."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedimb import losses
from fedimb.config import Config, load_config
from fedimb.federation import federation_key, get_federation
from fedimb.losses import make_loss, validate_counts
from fedimb.losses import params as loss_params
from fedimb.records import TensorArray, state_record


def test_a_configs_federation_key_is_computed_once(monkeypatch):
    config = load_config(None, {"dataset": "digits", "num-clients": 5})
    fed = get_federation(config)
    calls = []
    real = Config.to_flat
    monkeypatch.setattr(Config, "to_flat", lambda self: calls.append(1) or real(self))
    assert get_federation(config) is fed
    assert calls == []  # the same object: its key is remembered
    twin = load_config(None, {"dataset": "digits", "num-clients": 5})
    assert federation_key(twin) == federation_key(config)
    assert get_federation(twin) is fed and calls  # an equal config: computed, same data
    other = load_config(None, {"dataset": "digits", "num-clients": 6})
    assert federation_key(other) != federation_key(config)


@pytest.mark.parametrize("name", ["ce", "ldam-drw", "class-balanced", "balanced-softmax"])
def test_remembered_loss_params_equal_freshly_built_ones(name, monkeypatch):
    counts = np.array([5, 0, 12, 3])
    first = make_loss(name, counts, server_round=3, num_rounds=4).params
    again = make_loss(name, counts, server_round=3, num_rounds=4).params
    monkeypatch.setattr(loss_params, "_PARAMS_MADE", {})
    fresh = make_loss(name, counts, server_round=3, num_rounds=4).params
    for field in losses.TENSOR_FIELDS:
        torch.testing.assert_close(getattr(first, field), getattr(fresh, field), rtol=0, atol=0)
        assert getattr(first, field) is getattr(again, field)
    assert (first.s, first.gamma, first.base) == (fresh.s, fresh.gamma, fresh.base)
    other = make_loss(name, np.array([1, 9, 0, 3]), server_round=3, num_rounds=4).params
    assert name == "ce" or not torch.equal(other.weight + other.offset + other.margin,
                                           first.weight + first.offset + first.margin)  # fmt: skip


def test_whole_number_counts_take_the_short_checks_with_the_same_result():
    for counts in (np.array([3, 0, 2]), np.array([3, 0, 2], dtype=np.int32), [3, 0, 2]):
        got = validate_counts(counts)
        assert got.dtype == np.int64 and got.tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match="must be >= 0"):
        validate_counts(np.array([3, -1, 2]))
    with pytest.raises(ValueError, match="all zero"):
        validate_counts(np.array([0, 0]))
    with pytest.raises(ValueError, match="1-D sequence"):
        validate_counts(np.array([[1, 2]]))


def test_state_record_equals_flowers_record_of_the_same_state():
    state = {"w": torch.randn(3, 2), "b": torch.arange(4), "n": torch.tensor(7)}
    record = state_record(state)
    assert list(record) == ["w", "b", "n"]
    assert all(isinstance(a, TensorArray) for a in record.values())
    assert record == ArrayRecord(state)
    restored = record.to_torch_state_dict()
    for key, value in state.items():
        assert torch.equal(restored[key], value)


@pytest.mark.parametrize("name", ["cnn", "resnet32", "pfl-cnn"])
def test_channels_last_evaluation_predicts_what_the_default_order_predicts(name):
    from fedimb.models import build_model
    from fedimb.train import eval_memory_format, predict

    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10)
    params = list(model.parameters())
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)

    def to_float(batch):
        return batch.float() / 255.0 - 0.5

    with eval_memory_format(model, x) as fmt:
        assert fmt is torch.channels_last
    model.eval()
    with torch.no_grad():
        want = model(to_float(x))
    got = predict(model, x, to_float, batch_size=24)
    assert torch.equal(got, want.argmax(1))
    assert list(model.parameters()) == params  # the same Parameters, back in NCHW order
    assert all(p.is_contiguous() for p in model.parameters())
    with eval_memory_format(model, torch.zeros(2, 12)) as fmt:
        assert fmt is torch.contiguous_format  # features, not images
