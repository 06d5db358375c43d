"""optimizer-state = "keep": a client's SGD momentum buffers carry over its rounds.

One client over R rounds of one epoch is then R epochs of one torch.optim.SGD, the
vectorised trainer keeps them as the one-at-a-time trainer does, and the buffers are in
the checkpoint, so a resumed run equals an uninterrupted one.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedimb.batched import train_clients
from fedimb.config import load_config
from fedimb.data.augment import crop_flip
from fedimb.federation import get_federation, init_model
from fedimb.losses import make_loss
from fedimb.models import build_model
from fedimb.protocol import OPTIMIZER_STATE
from fedimb.results import read_json, read_jsonl
from fedimb.server import load_checkpoint
from fedimb.sim import run_experiment
from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan, train_client


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def test_kept_momentum_makes_rounds_one_sgd_run():
    torch.manual_seed(0)
    model = build_model("mlp", (12,), 4, hidden=16)
    reference = build_model("mlp", (12,), 4, hidden=16)
    reference.load_state_dict(model.state_dict())
    x, y = _data(40, 0)
    loss = make_loss("ce", np.bincount(y.numpy(), minlength=4))
    settings = TrainSettings(
        batch_size=8, momentum=0.9, weight_decay=1e-3, keep_optimizer_state=True
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    kept = None
    for r, lr in enumerate([0.05, 0.1, 0.01], start=1):
        plan = make_plan(y.numpy(), settings, client_rng(0, r, 0))
        job = ClientJob(x=x, y=y, loss=loss, plan=plan, momentum=kept)
        result = train_client(model, job, identity, TrainSettings(**{**vars(settings), "lr": lr}))
        kept = result.momentum
        opt.param_groups[0]["lr"] = lr
        for batch in plan.batches:
            opt.zero_grad()
            F.cross_entropy(reference(x[batch]), y[batch]).backward()
            opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(result.state[name], p.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            kept[name], opt.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7
        )
    # Reset (the default) returns no buffers: each round starts from zero.
    assert train_client(model, job, identity, TrainSettings(momentum=0.9)).momentum is None


def test_vectorised_training_keeps_the_same_buffers_as_one_at_a_time():
    torch.manual_seed(0)
    model = build_model("mlp", (12,), 4, hidden=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(
        epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4, keep_optimizer_state=True
    )
    gen = torch.Generator().manual_seed(1)
    jobs = []
    for pid, n in enumerate([19, 24, 7]):  # uneven: clients finish at different steps
        x, y = _data(n, pid)
        # client 1 comes without buffers (its first round): it starts from zero
        momentum = (
            None
            if pid == 1
            else {k: 0.1 * torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}
        )
        plan = make_plan(y.numpy(), settings, client_rng(0, 2, pid))
        counts = np.bincount(y.numpy(), minlength=4)
        jobs.append(ClientJob(x=x, y=y, loss=make_loss("ce", counts), plan=plan, momentum=momentum))
    one_by_one = []
    for job in jobs:
        model.load_state_dict(state)
        one_by_one.append(train_client(model, job, identity, settings))
    together = train_clients(model, state, jobs, identity, settings)
    for a, b in zip(one_by_one, together, strict=True):
        for name in a.momentum:
            torch.testing.assert_close(a.state[name], b.state[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.momentum[name], b.momentum[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ whole runs

ROUNDS = 3


def one_client(**overrides):
    """The centralised recipe at digits size: warm-up, a drop, momentum kept, decay."""
    base = {
        "num-clients": 1,
        "num-rounds": ROUNDS,
        "local-epochs": 1,
        "batch-size": 64,
        "lr": 0.1,
        "momentum": 0.9,
        "weight-decay": 5e-4,
        "optimizer-state": "keep",
        "augment": "on",
        "engine": "inprocess",
        "partition.name": "iid",
        "strategy.min-train-clients": 1,
        "lr-schedule.warmup-rounds": 2,
        "lr-schedule.milestones": "3",
        "lr-schedule.gamma": 0.1,
    }
    return load_config(overrides={**base, **overrides})


def final_weights(out):
    return load_checkpoint(out / "checkpoint.pt")["state_dict"]


@pytest.mark.slow
def test_one_client_run_equals_a_plain_pytorch_loop(tmp_path):
    config = one_client()
    run_experiment(config, tmp_path, progress=False)
    fed = get_federation(config)
    model = init_model(config, fed)
    x, y = fed.client_tensors(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    settings = TrainSettings(batch_size=64, augment=True)  # what the plan needs
    model.train()
    for r in range(1, ROUNDS + 1):
        opt.param_groups[0]["lr"] = 0.1 * min(r / 2, 1) * (0.1 if r >= 3 else 1)
        plan = make_plan(fed.client_labels(0), settings, client_rng(config["seed"], r, 0))
        for batch, shift, flip in zip(plan.batches, plan.shift, plan.flip, strict=True):
            inputs = crop_flip(x[batch], torch.as_tensor(shift), torch.as_tensor(flip), 4)
            opt.zero_grad()
            F.cross_entropy(model(fed.dataset.to_float(inputs)), y[batch]).backward()
            opt.step()
    got = final_weights(tmp_path)
    assert set(got) == set(model.state_dict())
    for name, want in model.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    # Not so by accident: resetting the buffers every round ends elsewhere.
    run_experiment(one_client(**{"optimizer-state": "reset"}), tmp_path / "reset", progress=False)
    reset = final_weights(tmp_path / "reset")
    assert max(float((reset[k] - got[k]).abs().max()) for k in got) > 1e-3


@pytest.mark.slow
def test_resume_with_kept_momentum_equals_an_uninterrupted_run(tmp_path, run_until):
    config = one_client(**{"num-clients": 2, "num-rounds": 4, "strategy.min-train-clients": 2})
    run_experiment(config, tmp_path / "full", progress=False)

    run_until(config, tmp_path / "cut", 2)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["client_state"]
    assert set(saved) == {0, 1} and all(set(s) == {OPTIMIZER_STATE} for s in saved.values())
    run_experiment(config, tmp_path / "cut", resume=True, progress=False)
    assert read_json(tmp_path / "cut" / "summary.json")["status"] == "completed"
    full, cut = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for name in full:
        assert torch.equal(full[name], cut[name]), name
    curve = [
        (r["round"], r["balanced_error"]) for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")
    ]
    resumed = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert [(r["round"], r["balanced_error"]) for r in resumed] == curve
