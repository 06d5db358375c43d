"""Seeded dropout: the vectorised trainer takes dropout models, and what vmap cannot run
trains one client at a time, decided before round 1."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from fedimb.batched import can_batch, model_blocker, train_clients
from fedimb.config import ConfigError, load_config
from fedimb.dropout import keep_mask, seeded_dropout
from fedimb.losses import make_loss
from fedimb.preflight import prepare
from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan, train_client

HERE = __name__


def dropout_cnn(input_shape, num_classes, *, p=0.5):
    """A plug-in CNN with dropout, as users write them."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(p),
        nn.Linear(4 * height * width, 16),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(16, num_classes),
    )


class SignGated(nn.Module):
    """Data-dependent Python control flow: vmap cannot run it, one client at a time can."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.sum() > 0:  # a Python bool of a tensor
            x = -x
        return self.fc(x)


def sign_gated(input_shape, num_classes):
    return SignGated(int(np.prod(input_shape)), num_classes)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _jobs(sizes, shape=(1, 6, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9)
    jobs = []
    for pid, n in enumerate(sizes):
        y = torch.randint(0, 3, (n,), generator=gen)
        counts = np.bincount(y.numpy(), minlength=3)
        jobs.append(
            ClientJob(
                x=torch.randn(n, *shape, generator=gen),
                y=y,
                loss=make_loss("ce", counts),
                plan=make_plan(y.numpy(), settings, client_rng(seed, 2, pid)),
            )
        )
    return jobs, settings


def _one_at_a_time(model, state, jobs, settings):
    out = []
    for job in jobs:
        model.load_state_dict(state)
        out.append(train_client(model, job, identity, settings))
    return out


def _assert_same(a, b):
    assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-5)
    for key in a.state:
        torch.testing.assert_close(a.state[key], b.state[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_vectorised_dropout_equals_one_client_at_a_time(p):
    torch.manual_seed(0)
    model = dropout_cnn((1, 6, 6), 3, p=p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    jobs, settings = _jobs([19, 24, 7, 16])
    assert can_batch(model, jobs, identity) is None
    seq = _one_at_a_time(model, state, jobs, settings)
    vec = train_clients(model, state, jobs, identity, settings)
    for a, b in zip(seq, vec, strict=True):
        _assert_same(a, b)
    # Another process-wide RNG state changes nothing: the masks come from the plans.
    torch.manual_seed(123)
    again = train_clients(model, state, jobs, identity, settings)
    for a, b in zip(vec, again, strict=True):
        _assert_same(a, b)


def test_a_clients_masks_do_not_depend_on_its_group():
    torch.manual_seed(0)
    model = dropout_cnn((1, 6, 6), 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    jobs, settings = _jobs([12, 16, 9, 16])
    whole = train_clients(model, state, jobs, identity, settings)
    pair = train_clients(model, state, [jobs[0], jobs[3]], identity, settings)
    _assert_same(whole[3], pair[1])
    # Without dropout, clients 1 and 3 (same data size, other data) would still differ;
    # with p = 0.5 the same client under another seed must: masks are per client.
    reseeded = ClientJob(**{**jobs[3].__dict__})
    reseeded.plan = make_plan(jobs[3].y.numpy(), settings, client_rng(7, 2, 3))
    reseeded.plan.batches = jobs[3].plan.batches  # same batches, other dropout seed
    other = train_clients(model, state, [jobs[0], reseeded], identity, settings)
    assert reseeded.plan.dropout_seed != jobs[3].plan.dropout_seed
    assert not torch.allclose(other[1].state["4.weight"], pair[1].state["4.weight"])


def test_masks_keep_each_element_with_probability_one_minus_p():
    shape = torch.Size([64, 500])
    for p in (0.1, 0.5, 0.8):
        masks = [keep_mask(torch.tensor(s), 11, shape, p) for s in range(4)]
        for m in masks:
            kept = (m > 0).float()
            # 32,000 Bernoulli draws: the kept fraction is within 4 standard deviations
            sd = (p * (1 - p) / shape.numel()) ** 0.5
            assert abs(kept.mean().item() - (1 - p)) < 4 * sd
            assert torch.allclose(m[m > 0], torch.tensor(1 / (1 - p)))
        # different seeds: masks agree only as often as independent draws would
        agree = ((masks[0] > 0) == (masks[1] > 0)).float().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.02
    # Neighbouring elements are not correlated (rows of a batch are independent).
    m = (keep_mask(torch.tensor(5), 3, torch.Size([100_000]), 0.5) > 0).float() - 0.5
    assert abs((m[1:] * m[:-1]).mean().item()) < 0.01


def test_seeded_dropout_is_identity_in_eval_mode_and_restores_the_layer():
    model = dropout_cnn((1, 6, 6), 3)
    x = torch.randn(4, 1, 6, 6)
    model.eval()
    with seeded_dropout(model):
        out = model(x)
    torch.testing.assert_close(out, model(x))
    assert "forward" not in model[3].__dict__  # nn.Dropout's own forward again


def test_a_model_vmap_cannot_run_is_found_before_training():
    model = sign_gated((1, 6, 6), 3)
    jobs, settings = _jobs([8, 8])
    reason = model_blocker(model, jobs[0].x, identity)
    assert reason is not None and reason.startswith("vmap cannot run it (")
    assert "\n" not in reason
    assert can_batch(model, jobs, identity) == reason
    with pytest.raises(ValueError, match="cannot train these clients together: vmap"):
        train_clients(model, model.state_dict(), jobs, identity, settings)
    train_client(model, jobs[0], identity, settings)  # one at a time it trains


def _digits(**overrides):
    base = {"dataset": "digits", "num-clients": 4, "num-rounds": 1, "engine": "inprocess"}
    return load_config(None, {**base, "device": "cpu", **overrides})


def test_batched_on_with_a_model_vmap_cannot_run_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        prepare(_digits(**{"batched": "on", "model.name": f"{HERE}:sign_gated"}))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"batched = 'on' but model '{HERE}:sign_gated' cannot train clients together: "
        "vmap cannot run it ("
    )
    assert message.endswith("set batched = 'auto' or 'off' to train them one at a time")


def test_batched_on_with_batchnorm_is_a_config_error():
    run = _digits(**{"batched": "on", "model.name": "resnet32", "model.norm": "batch"})
    with pytest.raises(ConfigError, match="model 'resnet32' cannot train clients together: "):
        prepare(run)


@pytest.mark.slow
def test_auto_says_before_round_1_that_such_a_model_trains_one_at_a_time(
    tmp_path, caplog, monkeypatch
):
    from fedimb import client
    from fedimb.results import read_jsonl
    from fedimb.sim import run_experiment

    monkeypatch.setattr(client, "_WARNED", set())
    run = _digits(**{"model.name": f"{HERE}:sign_gated", "num-rounds": 2})
    with caplog.at_level(logging.WARNING):
        run_experiment(run, tmp_path, progress=False)
    said = [r.getMessage() for r in caplog.records if "one at a time" in r.getMessage()]
    assert len(said) == 1  # by the preflight, not again by a client
    assert said[0].startswith("batched = 'auto' but clients train one at a time: vmap")
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3  # round 0 and both rounds


@pytest.mark.slow
def test_a_dropout_plugin_trains_vectorised_in_a_run(tmp_path):
    from fedimb.results import read_jsonl
    from fedimb.sim import run_experiment

    run = _digits(**{"model.name": f"{HERE}:dropout_cnn", "batched": "on", "num-rounds": 2})
    run_experiment(run, tmp_path / "on", progress=False)
    run_experiment(run.with_overrides({"batched": "off"}), tmp_path / "off", progress=False)
    on, off = (
        read_jsonl(tmp_path / "on" / "metrics.jsonl"),
        read_jsonl(tmp_path / "off" / "metrics.jsonl"),
    )
    key = "balanced_error"
    assert [r[key] for r in on] == pytest.approx([r[key] for r in off], abs=0.02)
