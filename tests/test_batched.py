"""Training many clients at once equals training them one at a time (same plan, same update)."""

import numpy as np
import pytest
import torch

from fedimb.algorithm import ClientHalf, ClientTerms
from fedimb.batched import can_batch, pays_off, train_clients
from fedimb.data.augment import crop_flip
from fedimb.losses import make_loss
from fedimb.models import build_model
from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan, train_client


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """Like Dataset.to_float: normalise per channel, channels at dim 1 of a batch."""
    mean = torch.tensor([0.1, -0.2, 0.3], device=x.device).view(1, 3, *([1] * (x.dim() - 2)))
    return (x.float() - mean) / 0.5


class ProxAndControl(ClientHalf):
    """FedProx's and SCAFFOLD's terms at once: a scalar and a per-parameter input."""

    def gradient(self, param, global_param, inputs):
        return inputs["mu"] * (param - global_param) + inputs["control"]


PROX_AND_CONTROL = ProxAndControl()


def _terms(prox_mu, control):
    """The client-half terms of a job with FedProx's mu and/or SCAFFOLD's c - c_i."""
    from strategies.fedprox import PROXIMAL
    from strategies.scaffold import Scaffold

    if prox_mu and control is not None:
        return ClientTerms(PROX_AND_CONTROL, {"mu": prox_mu, "control": control})
    if prox_mu:
        return ClientTerms(PROXIMAL, {"mu": prox_mu})
    if control is not None:
        return ClientTerms(Scaffold.client_half, {"correction": control})
    return None


def _jobs(
    model, settings, loss_name, shape, sizes, *, prox_mu=0.0, control=False, seed=0, **params
):
    """Clients with uneven data (different step counts, short last batches)."""
    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for pid, n in enumerate(sizes):
        classes = torch.tensor([pid % 4, (pid + 1) % 4])
        y = classes[torch.randint(0, 2, (n,), generator=gen)]
        x = torch.randn(n, *shape, generator=gen)
        counts = np.bincount(y.numpy(), minlength=4)
        loss = make_loss(loss_name, counts, server_round=3, num_rounds=4, **params)
        plan = make_plan(y.numpy(), settings, client_rng(seed, 3, pid))
        ctl = None
        if control:
            ctl = {
                n: 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
            }
        jobs.append(ClientJob(x=x, y=y, loss=loss, plan=plan, terms=_terms(prox_mu, ctl)))
    return jobs


def _sequential(model, state, jobs, settings, to_float=identity):
    out = []
    for job in jobs:
        model.load_state_dict(state)
        out.append(train_client(model, job, to_float, settings))
    return out


@pytest.mark.parametrize(
    ("loss_name", "params", "momentum", "wd", "prox", "control"),
    [
        ("ce", {}, 0.0, 0.0, 0.0, False),
        ("ldam-drw", {}, 0.9, 5e-4, 0.0, False),
        ("class-balanced", {"base": "focal"}, 0.9, 0.0, 0.01, False),
        ("fedrs", {}, 0.0, 0.0, 0.0, True),
        ("balanced-softmax", {}, 0.5, 1e-3, 0.1, True),
    ],
)
def test_vectorised_training_equals_one_client_at_a_time(
    loss_name, params, momentum, wd, prox, control
):
    torch.manual_seed(0)
    model = build_model("mlp", (12,), 4, hidden=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=momentum, weight_decay=wd)
    jobs = _jobs(
        model, settings, loss_name, (12,), [19, 24, 7, 16], prox_mu=prox, control=control, **params
    )
    seq = _sequential(model, state, jobs, settings)
    vec = train_clients(model, state, jobs, identity, settings)
    for a, b in zip(seq, vec, strict=True):
        assert a.num_steps == b.num_steps and a.num_examples == b.num_examples
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-5)
        for key in a.state:
            torch.testing.assert_close(a.state[key], b.state[key], rtol=1e-4, atol=1e-5)
    # the update is real: weights moved
    assert not torch.allclose(vec[0].state["1.weight"], state["1.weight"])


def test_each_step_is_one_vectorised_call_despite_short_batches(monkeypatch):
    """Short last batches of different lengths are padded, not trained in groups of
    their own: one call per step, over the clients still training."""
    import fedimb.batched

    calls = []
    real_vmap = fedimb.batched.vmap

    def counting_vmap(fn):
        step = real_vmap(fn)

        def counted(*args):
            calls.append(args[2].shape[:2])  # x: [clients, batch, ...]
            return step(*args)

        return counted

    monkeypatch.setattr(fedimb.batched, "vmap", counting_vmap)
    model = build_model("mlp", (12,), 4, hidden=16)
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.1)
    # Batches per client: 19 -> 8, 8, 3; 24 -> 8, 8, 8; 7 -> 7; 16 -> 8, 8.
    jobs = _jobs(model, settings, "ce", (12,), [19, 24, 7, 16])
    train_clients(model, model.state_dict(), jobs, identity, settings)
    assert calls == [(4, 8), (3, 8), (2, 8)]


def test_padding_repeats_the_batch_so_an_unused_sample_cannot_spoil_it():
    """A client's short batch is padded with copies of its own rows: a sample outside the
    batch whose forward pass overflows (here sample 0, never trained on) must not turn
    the update into NaN when training alone keeps it finite."""
    from fedimb.train import ClientPlan

    torch.manual_seed(0)
    model = build_model("mlp", (12,), 4, hidden=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(batch_size=8, lr=0.1)

    def job(n, batches):
        x, y = torch.randn(n, 12), torch.arange(n) % 4
        loss = make_loss("ce", np.bincount(y.numpy(), minlength=4))
        return ClientJob(x=x, y=y, loss=loss, plan=ClientPlan([np.array(b) for b in batches]))

    short = job(12, [list(range(1, 9)), [9, 10, 11]])
    short.x[0] = float("inf")
    jobs = [short, job(16, [list(range(8)), list(range(8, 16))])]
    alone = _sequential(model, state, jobs, settings)
    together = train_clients(model, state, jobs, identity, settings)
    assert together[0].finite
    for a, b in zip(alone, together, strict=True):
        for key in a.state:
            torch.testing.assert_close(a.state[key], b.state[key], rtol=1e-4, atol=1e-5)


def test_vectorised_cnn_with_augmentation_equals_sequential():
    torch.manual_seed(1)
    model = build_model("cnn", (3, 8, 8), 4, width=4, hidden=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=1, batch_size=5, lr=0.05, augment=True, padding=2)
    jobs = _jobs(model, settings, "ce", (3, 8, 8), [11, 9, 5])
    assert jobs[0].plan.shift is not None
    seq = _sequential(model, state, jobs, settings, per_channel)
    vec = train_clients(model, state, jobs, per_channel, settings)
    for a, b in zip(seq, vec, strict=True):
        for key in a.state:
            torch.testing.assert_close(a.state[key], b.state[key], rtol=1e-4, atol=1e-5)


def test_batchnorm_models_are_not_batched():
    model = build_model("resnet32", (3, 8, 8), 4, norm="batch")
    settings = TrainSettings()
    jobs = _jobs(build_model("mlp", (3, 8, 8), 4), settings, "ce", (3, 8, 8), [4, 4])
    assert "BatchNorm" in can_batch(model, jobs)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_clients(model, model.state_dict(), jobs, identity, settings)


def test_crop_flip_matches_per_sample_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 7, generator=gen)
    shift = torch.randint(0, 5, (6, 2), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    out = crop_flip(x, shift, flip, padding=2)
    for i in range(6):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        dy, dx = shift[i].tolist()
        ref = padded[:, dy : dy + 5, dx : dx + 7]
        if flip[i]:
            ref = ref.flip(-1)  # crop, then mirror
        torch.testing.assert_close(out[i], ref)


def test_plan_is_seeded_per_client_and_round():
    settings = TrainSettings(epochs=2, batch_size=4, augment=True)
    labels = np.repeat([0, 1], 9)
    a = make_plan(labels, settings, client_rng(0, 1, 5))
    b = make_plan(labels, settings, client_rng(0, 1, 5))
    c = make_plan(labels, settings, client_rng(0, 2, 5))
    assert all(np.array_equal(p, q) for p, q in zip(a.batches, b.batches, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a.batches, c.batches, strict=True))
    assert a.num_drawn == 36 and a.num_steps == 10  # 2 epochs x ceil(18 / 4)
    assert sorted(np.concatenate(a.batches[:5])) == list(range(18))  # an epoch covers every sample


def test_auto_vectorises_convolutions_only_on_a_gpu():
    cnn = build_model("cnn", (3, 8, 8), 4, width=4, hidden=16)
    mlp = build_model("mlp", (12,), 4, hidden=16)
    assert not pays_off(cnn, torch.device("cpu"))  # grouped convolutions: slow on CPU
    assert pays_off(mlp, torch.device("cpu"))
    assert pays_off(cnn, torch.device("cuda"))


def test_finiteness_check_flags_exactly_the_non_finite_clients():
    """The fast path (a finite sum proves finite terms) must neither miss a NaN or inf
    nor flag a finite client whose sum overflows."""
    from fedimb.batched import _all_finite

    stacks = {"w": torch.randn(5, 3, 4), "b": torch.randn(5, 4)}
    shared = {"count": torch.zeros(2, dtype=torch.long)}
    assert _all_finite(stacks, shared) == [True] * 5
    stacks["w"][1, 2, 3] = float("nan")
    stacks["b"][3, 0] = float("-inf")
    stacks["b"][4, :2] = 3e38  # finite values whose float32 sum is inf
    assert _all_finite(stacks, shared) == [True, False, True, False, True]
    # A non-finite tensor shared by every client (e.g. a buffer) fails them all.
    shared["scale"] = torch.tensor([1.0, float("inf")])
    assert _all_finite(stacks, shared) == [False] * 5


class _FlagRecorder(torch.nn.Module):
    """Records ``torch.backends.cudnn.benchmark`` in every forward and backward."""

    def __init__(self, inner: torch.nn.Module, seen: list[tuple[str, bool]], eager: bool) -> None:
        super().__init__()
        self.inner, self.seen, self.eager = inner, seen, eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(("forward", torch.backends.cudnn.benchmark))
        out = self.inner(x)
        if self.eager:  # torch.func's transforms take no tensor hooks
            out.register_hook(
                lambda g: self.seen.append(("backward", torch.backends.cudnn.benchmark))
            )
        return out


@pytest.mark.parametrize("vectorised", [True, False])
@pytest.mark.parametrize("autotune", [True, False])
def test_training_steps_run_with_the_settings_cudnn_autotuning_and_restore_it(vectorised, autotune):
    """cuDNN autotuning is global to the process: training sets it for its own steps
    (forward and backward), whatever the caller had, and puts the caller's back."""
    seen: list[tuple[str, bool]] = []
    model = _FlagRecorder(build_model("mlp", (12,), 4, hidden=16), seen, eager=not vectorised)
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.1, cudnn_benchmark=autotune)
    jobs = _jobs(model, settings, "ce", (12,), [19, 7])
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not autotune
    try:
        if vectorised:
            train_clients(model, model.state_dict(), jobs, identity, settings)
        else:
            _sequential(model, model.state_dict(), jobs, settings)
        assert torch.backends.cudnn.benchmark is (not autotune)
    finally:
        torch.backends.cudnn.benchmark = before
    assert {kind for kind, _ in seen} == ({"forward"} if vectorised else {"forward", "backward"})
    assert len(seen) >= 3 and all(flag is autotune for _, flag in seen)
