"""Local training of one client, and evaluation of a model on a test set.

A round of local training is planned before it runs (:func:`make_plan`): the batch
indices of every step and the augmentation of every sample, drawn from a generator
seeded by (run seed, round, client). Both trainers consume the same plan, so training a
client alone (:func:`train_client`, here) and training many at once
(:func:`fedimb.batched.train_clients`) give the same update up to float rounding, and
a client's update does not depend on which other clients share its group.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedimb.data.augment import crop_flip
from fedimb.dropout import seeded_dropout
from fedimb.sampling import epoch_indices

if TYPE_CHECKING:
    from fedimb.algorithm import ClientTerms

ToFloat = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of local training shared by every client of a run."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    augment: bool = False
    padding: int = 4
    bf16: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    """cuDNN autotuning (``torch.backends.cudnn.benchmark``) while training on CUDA:
    each new input shape is timed once, then its fastest kernels are used."""
    keep_optimizer_state: bool = False
    """Return each client's momentum buffers (``TrainResult.momentum``), to start its
    next round from them (``ClientJob.momentum``) instead of from zero."""


@dataclasses.dataclass
class ClientPlan:
    """What one client does in one round: its batches and their augmentation.

    ``batches[t]`` holds the indices (into the client's own samples) of step t;
    ``shift`` / ``flip`` (when augmenting) give, per step, each sample's crop offset
    (dy, dx in [0, 2*padding]) and horizontal flip.
    """

    batches: list[np.ndarray]
    shift: list[np.ndarray] | None = None
    flip: list[np.ndarray] | None = None
    dropout_seed: int = 0
    """Seeds the client's dropout masks (:mod:`fedimb.dropout`) in either trainer."""

    @property
    def num_steps(self) -> int:
        return len(self.batches)

    @property
    def num_drawn(self) -> int:
        """Samples drawn over all steps (epochs times the sampler's epoch length)."""
        return int(sum(len(b) for b in self.batches))


@dataclasses.dataclass
class ClientJob:
    """One client's inputs for a round of local training."""

    x: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    plan: ClientPlan
    terms: ClientTerms | None = None
    """What the algorithm's client half adds (:mod:`fedimb.algorithm`): a term added
    to every gradient before the optimizer step, and its work after training."""
    momentum: Mapping[str, torch.Tensor] | None = None
    """SGD's momentum buffers per parameter name where the client's last round left
    them (``optimizer-state = "keep"``); None: they start from zero, as a new SGD's."""


@dataclasses.dataclass
class TrainResult:
    """A client's updated weights and what it reports."""

    state: dict[str, torch.Tensor]
    loss: float
    num_examples: int
    """The client's training samples: FedAvg's weight, whatever the epochs and sampler."""
    num_steps: int
    finite: bool | None = None
    """Whether every value of ``state`` was finite, checked on the training device
    (None: not checked). Whoever changes ``state`` afterwards must reset it."""
    momentum: dict[str, torch.Tensor] | None = None
    """SGD's momentum buffers per parameter name after the round, when
    ``TrainSettings.keep_optimizer_state`` (and momentum > 0); else None."""


def client_rng(seed: int, server_round: int, partition_id: int) -> np.random.Generator:
    """The generator of one client in one round: independent of engine and grouping."""
    return np.random.default_rng(np.random.SeedSequence([seed, server_round, partition_id]))


def make_plan(
    labels: np.ndarray,
    settings: TrainSettings,
    rng: np.random.Generator,
    *,
    sampler: str = "instance",
    server_round: int = 1,
    num_rounds: int = 1,
    drs_start: float | int | None = None,
    **sampler_params: Any,
) -> ClientPlan:
    """Draw a client's batches (and augmentation) for one round of local training
    (``sampler_params``: a user sampler's own parameters)."""
    batches: list[np.ndarray] = []
    for _ in range(settings.epochs):
        order = epoch_indices(
            sampler,
            labels,
            rng,
            server_round=server_round,
            num_rounds=num_rounds,
            drs_start=drs_start,
            **sampler_params,
        )
        batches += [
            order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)
        ]
    if not settings.augment:
        return ClientPlan(batches, dropout_seed=_dropout_seed(rng))
    span = 2 * settings.padding + 1
    shift = [rng.integers(0, span, size=(len(b), 2)) for b in batches]
    flip = [rng.random(len(b)) < 0.5 for b in batches]
    # Drawn last: the batches and augmentation stay those of earlier versions.
    return ClientPlan(batches, shift, flip, dropout_seed=_dropout_seed(rng))


def _dropout_seed(rng: np.random.Generator) -> int:
    """32 random bits of ``rng`` (its raw output: a tenth of ``integers``' cost)."""
    return int(rng.bit_generator.random_raw()) & 0xFFFFFFFF


def batch_inputs(
    job: ClientJob, step: int, to_float: ToFloat, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of one step of one client, augmented on the device."""
    device = job.x.device
    idx = torch.as_tensor(job.plan.batches[step], device=device)
    x = job.x[idx]
    if job.plan.shift is not None:  # on the raw images: the padding is black, as torchvision's
        shift = torch.as_tensor(job.plan.shift[step], device=device)
        flip = torch.as_tensor(job.plan.flip[step], device=device)
        x = crop_flip(x, shift, flip, settings.padding)
    x = to_float(x)
    if settings.channels_last and device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, job.y[idx]


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; a no-op otherwise."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_autotuning(on: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set to ``on`` inside the block, restored after it.

    Scoped to training, so a run's setting neither leaks into the caller's code nor
    depends on it (the flag is global to the process).
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def effective_steps(num_steps: float, momentum: float) -> float:
    """Effective step count ``a_i`` of ``num_steps`` SGD steps with heavy-ball momentum.

    ``a = (tau - rho (1 - rho**tau) / (1 - rho)) / (1 - rho)``: the sum over local
    steps of the geometric weights ``(1 - rho**k) / (1 - rho)`` that momentum puts on
    each gradient; ``a = tau`` for ``rho = 0``.
    """
    if momentum == 0.0:
        return float(num_steps)
    rho = momentum
    return (num_steps - rho * (1.0 - rho**num_steps) / (1.0 - rho)) / (1.0 - rho)


def train_client(
    model: nn.Module,
    job: ClientJob,
    to_float: ToFloat,
    settings: TrainSettings,
) -> TrainResult:
    """Train ``model`` in place on one client's plan with SGD; return its new state.

    The algorithm's gradient term (``job.terms``, e.g. a proximal term or a control
    correction) is added to the gradient before the optimizer step, as in the methods'
    papers. The momentum buffers start from ``job.momentum`` when the client kept them
    (else from zero).
    """
    device = job.x.device
    model.train()
    if settings.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = dict(model.named_parameters())
    terms = job.terms if job.terms is not None and job.terms.grad else None
    # The global weights the round starts from: the term's ``global_param``.
    anchor = {k: p.detach().clone() for k, p in params.items()} if terms is not None else None
    opt = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    if job.momentum is not None and settings.momentum:
        for name, p in params.items():  # as if one SGD had run through every round
            opt.state[p]["momentum_buffer"] = job.momentum[name].to(p.device, p.dtype).clone()
    total = torch.zeros((), device=device)
    with cudnn_autotuning(settings.cudnn_benchmark), seeded_dropout(model) as dropout:
        if dropout.active:
            dropout.seed = torch.tensor(job.plan.dropout_seed, device=device)
        for step in range(job.plan.num_steps):
            dropout.step = step
            x, y = batch_inputs(job, step, to_float, settings)
            opt.zero_grad(set_to_none=True)
            with autocast(device, settings.bf16):
                loss = job.loss(model(x), y)
            loss.backward()
            if terms is not None:
                with torch.no_grad():
                    for name, p in params.items():
                        p.grad.add_(terms.half.gradient(p, anchor[name], terms.for_param(name)))
            opt.step()
            total += loss.detach().float()
    steps = max(job.plan.num_steps, 1)
    momentum = None
    if settings.keep_optimizer_state and settings.momentum:
        # A client that took no step keeps what it came with (set above), or zeros.
        momentum = {
            name: buf.detach().clone()
            if (buf := opt.state[p].get("momentum_buffer")) is not None
            else torch.zeros_like(p.detach())
            for name, p in params.items()
        }
    return TrainResult(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        loss=float(total) / steps,
        num_examples=len(job.y),
        num_steps=job.plan.num_steps,
        momentum=momentum,
    )


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, to_float: ToFloat, batch_size: int = 1024
) -> torch.Tensor:
    """Predicted class of every sample of ``x`` (on ``x``'s device)."""
    model.eval()
    with eval_memory_format(model, x) as fmt:
        preds = [
            model(to_float(x[i : i + batch_size]).contiguous(memory_format=fmt)).argmax(1)
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)


@contextlib.contextmanager
def eval_memory_format(model: nn.Module, x: torch.Tensor) -> Iterator[torch.memory_format]:
    """The memory order for evaluating ``model`` on images ``x``: channels-last for a
    convolution model on a CPU (its forward passes take 0.6x the time there; not in
    training, where it pays for some models and costs for others: benchmarks/README.md),
    with the model's weights in that order for the block and back after it."""
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if x.device.type != "cpu" or x.dim() != 4 or not convolutional:
        yield torch.contiguous_format
        return
    model.to(memory_format=torch.channels_last)  # the same Parameters, their data moved
    try:
        yield torch.channels_last
    finally:
        model.to(memory_format=torch.contiguous_format)


def evaluate_counts(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    to_float: ToFloat,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class correct and total counts of ``model`` on (x, y): these add up across clients."""
    pred = predict(model, x, to_float, batch_size)
    total = torch.bincount(y, minlength=num_classes)
    correct = torch.bincount(y[pred == y], minlength=num_classes)
    return correct.cpu().numpy(), total.cpu().numpy()
