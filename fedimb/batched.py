"""Train many clients at once: one vectorised SGD step over stacked client weights.

Small local batches leave a GPU launch-bound: one client at a time uses a fraction of
the card. Here the weights of K clients are stacked along a new leading dimension and
one ``torch.func.vmap`` of ``grad`` computes all K clients' gradients in one step, each
on its own batch with its own loss tensors (built from its own label counts). The SGD
update (momentum, weight decay, the algorithm's gradient term from its client half) is
applied to the stacks directly, matching ``torch.optim.SGD``.

Clients may need different numbers of steps (uneven data) and their last batch may be
short. A short batch is padded to the step's batch length with rows that the loss masks
out (``valid``), so every step is one vectorised call over the clients still training;
while some client has finished, that call works on gathered slices of the stacks.
(Grouping clients by batch length instead cost a separate call per length: 57 calls for
a CIFAR-10 round of 100 label-skewed clients that needs 21 steps.)

Results equal :func:`fedimb.train.train_client` run client by client, up to float
rounding (tests/test_batched.py), because both consume the same :class:`ClientPlan`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedimb.algorithm import ClientHalf
from fedimb.data.augment import crop_flip
from fedimb.dropout import seeded_dropout
from fedimb.losses import TENSOR_FIELDS, imbalance_loss_tensors, stack_params
from fedimb.models import is_vectorisable, vectorise_blocker
from fedimb.train import (
    ClientJob,
    ToFloat,
    TrainResult,
    TrainSettings,
    autocast,
    cudnn_autotuning,
)


def pays_off(model: nn.Module, device: torch.device) -> bool:
    """Whether ``batched = "auto"`` should vectorise ``model``'s clients on ``device``.

    Always on CUDA. On CPU only for models without convolutions or embeddings: vmap
    turns a convolution over stacked weights into a grouped convolution, and an
    embedding's backward into a dense gradient per client, both slow on a CPU (timings
    in benchmarks/README.md).
    """
    return device.type != "cpu" or not (has_convolutions(model) or has_embeddings(model))


def has_embeddings(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is an embedding (a text model)."""
    return any(isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in model.modules())


def has_convolutions(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a convolution."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def wanted(mode: str, model: nn.Module, device: torch.device) -> bool:
    """Whether the ``batched`` setting ``mode`` (on / off / auto) vectorises ``model``'s
    clients on ``device``: the model must be vectorisable; their jobs must also
    :func:`can_batch`."""
    return is_vectorisable(model) and asked(mode, model, device)


def asked(mode: str, model: nn.Module, device: torch.device) -> bool:
    """Whether the ``batched`` setting ``mode`` asks for ``model``'s clients on ``device``
    to train together (``on``, or ``auto`` where it pays off), vectorisable or not."""
    return mode == "on" or (mode == "auto" and pays_off(model, device))


def can_batch(
    model: nn.Module, jobs: Sequence[ClientJob], to_float: ToFloat | None = None
) -> str | None:
    """None if these jobs can train together, else the reason they cannot.

    With ``to_float``, the model is also tried under vmap once (:func:`model_blocker`).
    """
    blocker = (
        vectorise_blocker(model)
        if to_float is None
        else model_blocker(model, jobs[0].x[:2], to_float)
    )
    if blocker is not None:
        return blocker
    if any(getattr(job.loss, "params", None) is None for job in jobs):
        return "a loss is a plain callable, not LossParams"
    first = jobs[0].loss.params
    for job in jobs[1:]:
        p = job.loss.params
        if (p.s, p.gamma, p.base) != (first.s, first.gamma, first.base):
            return "clients' losses differ in s, gamma or base"
    if len({job.x.device for job in jobs}) != 1:
        return "clients' data are on different devices"
    return _terms_blocker(jobs)


def _terms_blocker(jobs: Sequence[ClientJob]) -> str | None:
    """Why the jobs' algorithm terms cannot be stacked, or None."""
    terms = [job.terms for job in jobs]
    if all(t is None for t in terms):
        return None
    if any(t is None for t in terms) or len({id(t.half) for t in terms}) != 1:
        return "clients' algorithm terms differ (some clients have none, or another half)"
    first = terms[0].grad
    for t in terms[1:]:
        if t.grad.keys() != first.keys() or any(
            isinstance(t.grad[k], Mapping) != isinstance(first[k], Mapping) for k in first
        ):
            return "clients' gradient inputs differ in their names or kinds"
    return terms[0].half.can_batch(terms)


_PROBED: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def model_blocker(model: nn.Module, x: torch.Tensor, to_float: ToFloat) -> str | None:
    """Why ``model`` cannot train clients together (None if it can): a layer known not to
    vectorise (:func:`fedimb.models.vectorise_blocker`), else whatever a vectorised
    gradient of two clients on the samples ``x`` raises (data-dependent control flow, an
    in-place or random operation vmap rejects). Tried once per model instance.
    """
    blocker = vectorise_blocker(model)
    if blocker is not None:
        return blocker
    if model not in _PROBED:
        _PROBED[model] = _vmap_failure(model, to_float(x[:2]))
    return _PROBED[model]


def _vmap_failure(model: nn.Module, x: torch.Tensor) -> str | None:
    """What one vectorised gradient step of two clients on ``x`` raises, in one line."""
    training = model.training
    model.train()
    state = {n: t.detach() for n, t in model.named_parameters()}
    stacked = {n: torch.stack([t, t]) for n, t in state.items()}
    buffers = {n: torch.stack([t, t]) for n, t in model.named_buffers()}

    def client_loss(p, b, x, seed):
        dropout.seed = seed
        return functional_call(model, (p, b), (x,)).float().logsumexp(-1).mean()

    try:
        with seeded_dropout(model) as dropout:
            seeds = torch.tensor([1, 2], device=x.device)
            step = torch.func.vmap(grad_and_value(client_loss))  # not the training's vmap
            step(stacked, buffers, torch.stack([x, x]), seeds)
    except Exception as exc:  # the user's model: any error means "not under vmap"
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"vmap cannot run it ({type(exc).__name__}: {first[:160]})"
    finally:
        model.train(training)
    return None


def _pad_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack tensors of different lengths along a new dim 0, zero-padding dim 0."""
    longest = max(len(t) for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    for k, t in enumerate(tensors):
        out[k, : len(t)] = t
    return out


class _StackedPlan:
    """All clients' plans as padded arrays, moved to the device once per round.

    ``index[k, t, :lengths[k, t]]`` are client k's sample indices at step t (0 = no step);
    ``shift`` / ``flip`` hold their augmentation the same way (None without augmentation).
    Step t trains the clients ``members[t]`` (None: all; else a device tensor of their
    positions) at batch length ``sizes[t]``; ``valid[k, t, i]`` is False for padding,
    which the loss ignores. Padding repeats the batch's first sample and augmentation:
    a sample outside the batch could overflow the forward pass where the batch does not,
    and 0 x inf in the weight gradient is NaN.
    """

    def __init__(self, jobs: Sequence[ClientJob], batch_size: int, device: torch.device) -> None:
        k_all = len(jobs)
        self.max_steps = max((job.plan.num_steps for job in jobs), default=0)
        shape = (k_all, self.max_steps, batch_size)
        index = np.zeros(shape, dtype=np.int64)
        self.lengths = np.zeros(shape[:2], dtype=np.int64)
        augment = jobs[0].plan.shift is not None
        shift = np.zeros((*shape, 2), dtype=np.int64) if augment else None
        flip = np.zeros(shape, dtype=bool) if augment else None
        for k, job in enumerate(jobs):
            for t, batch in enumerate(job.plan.batches):
                n = len(batch)
                index[k, t, :n], index[k, t, n:] = batch, batch[0]
                self.lengths[k, t] = n
                if augment:
                    shift[k, t, :n], shift[k, t, n:] = job.plan.shift[t], job.plan.shift[t][0]
                    flip[k, t, :n], flip[k, t, n:] = job.plan.flip[t], job.plan.flip[t][0]
        self.index = torch.as_tensor(index, device=device)
        self.valid = torch.as_tensor(np.arange(batch_size) < self.lengths[..., None], device=device)
        self.shift = None if shift is None else torch.as_tensor(shift, device=device)
        self.flip = None if flip is None else torch.as_tensor(flip, device=device)
        active = [np.flatnonzero(self.lengths[:, t]) for t in range(self.max_steps)]
        self.sizes = [int(self.lengths[m, t].max()) for t, m in enumerate(active)]
        # Every step's members in one copy: a copy from pageable host memory waits for the
        # device, which would stall the host at each step where some client has finished.
        partial = [m for m in active if len(m) < k_all]
        flat = torch.as_tensor(np.concatenate(partial or [np.zeros(0, np.int64)]), device=device)
        views = iter(flat.split([len(m) for m in partial]))
        self.members = [None if len(m) == k_all else next(views) for m in active]


def train_clients(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    jobs: Sequence[ClientJob],
    to_float: ToFloat,
    settings: TrainSettings,
) -> list[TrainResult]:
    """Train every job from ``global_state`` together; one result per job, in order.

    ``model`` provides the architecture (its own weights are not used or changed).
    """
    with cudnn_autotuning(settings.cudnn_benchmark):  # a first model's vmap probe
        reason = can_batch(model, jobs, to_float)
    if reason is not None:
        raise ValueError(f"cannot train these clients together: {reason}")
    model.train()  # its dropout layers (functional_call keeps the modules' mode)
    device = jobs[0].x.device
    k_all = len(jobs)
    names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]
    params = {
        n: global_state[n].to(device).expand(k_all, *global_state[n].shape).clone() for n in names
    }
    buffers = {
        n: global_state[n].to(device).expand(k_all, *global_state[n].shape).clone()
        for n in buffer_names
    }
    anchor = {n: global_state[n].to(device) for n in names}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()} if settings.momentum else None
    # Kept buffers (optimizer-state = "keep"): those clients go on from theirs, the others
    # from zero, which equals SGD's first step (buffer = gradient, dampening 0).
    carried = momentum is not None and any(job.momentum is not None for job in jobs)
    if carried:
        for k, job in enumerate(jobs):
            if job.momentum is not None:
                for n in names:
                    momentum[n][k] = job.momentum[n].to(device, momentum[n].dtype)
    term = _stack_terms(jobs, names, device)

    lp = stack_params([job.loss.params for job in jobs])
    loss_tensors = {f: getattr(lp, f).to(device) for f in TENSOR_FIELDS}

    def client_loss(p, b, x, y, valid, seed, weight, offset, scale, margin, mask):
        dropout.seed = seed  # this client's (a vmapped 0-d tensor)
        with autocast(device, settings.bf16):
            logits = functional_call(model, (p, b), (x,))
        return imbalance_loss_tensors(
            logits.float(),
            y,
            weight,
            offset,
            scale,
            margin,
            mask,
            s=lp.s,
            gamma=lp.gamma,
            base=lp.base,
            valid=valid,
        )

    step_fn = vmap(grad_and_value(client_loss))
    data_x = _pad_stack([job.x for job in jobs])
    data_y = _pad_stack([job.y for job in jobs])
    plan = _StackedPlan(jobs, settings.batch_size, device)
    loss_sum = torch.zeros(k_all, device=device)
    everyone = torch.arange(k_all, device=device)
    seeds = torch.tensor([job.plan.dropout_seed for job in jobs], device=device)

    with cudnn_autotuning(settings.cudnn_benchmark), seeded_dropout(model) as dropout:
        for t in range(plan.max_steps):
            dropout.step = t
            size = plan.sizes[t]  # shorter batches are padded to it
            members = plan.members[t]
            sel = slice(None) if members is None else members
            rows = everyone if members is None else members
            idx = plan.index[rows, t, :size]  # [G, B]: already on the device
            # One [G*B, ...] batch: to_float normalises per channel at dim 1.
            x = data_x[rows[:, None], idx].flatten(0, 1)
            if plan.shift is not None:  # on the raw images, as one client's trainer does
                x = crop_flip(
                    x,
                    plan.shift[rows, t, :size].flatten(0, 1),
                    plan.flip[rows, t, :size].flatten(0, 1),
                    settings.padding,
                )
            x = to_float(x).unflatten(0, idx.shape)
            y = data_y[rows[:, None], idx]
            valid = plan.valid[rows, t, :size]
            p = {n: v[sel] for n, v in params.items()}
            bufs = {n: v[sel] for n, v in buffers.items()}
            grads, loss = step_fn(
                p, bufs, x, y, valid, seeds[sel], *(v[sel] for v in loss_tensors.values())
            )
            loss_sum[sel] += loss.detach().float()
            with torch.no_grad():
                _sgd_update(
                    params,
                    momentum,
                    grads,
                    sel,
                    anchor,
                    term,
                    settings,
                    first_step=t == 0 and not carried,
                )

    # One device-to-host copy per parameter stack, not one per client and tensor: each
    # client's state is a view of the host stacks (replies are built on the host anyway).
    # The copies are queued behind the training steps before anything waits for the
    # device, so allocating their (pinned) host memory overlaps the device's work.
    host = _copy_to_host({n: params[n].detach() for n in names})
    keep = momentum if settings.keep_optimizer_state else None
    host_momentum = None if keep is None else _copy_to_host(keep)
    unchanged = _copy_to_host({n: v for n, v in global_state.items() if n not in host})
    finite = _all_finite(params, {n: v for n, v in global_state.items() if n not in params})
    losses = loss_sum.tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the copies are complete: the host may read them
    results = []
    for k, job in enumerate(jobs):
        state = {n: unchanged[n] if n in unchanged else host[n][k] for n in global_state}
        results.append(
            TrainResult(
                state=state,
                loss=losses[k] / max(job.plan.num_steps, 1),
                num_examples=len(job.y),
                num_steps=job.plan.num_steps,
                finite=finite[k],
                # a client that took no step keeps the buffer it came with (or zeros)
                momentum=None if host_momentum is None else {n: host_momentum[n][k] for n in names},
            )
        )
    return results


def _all_finite(stacks: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> list[bool]:
    """Per client: whether its weights (``stacks``, dim 0 = client) and the ``shared``
    tensors are all finite. On the device, so the server need not scan the replies.

    A sum is finite only if every term is (NaN and inf propagate), so one read-only
    reduction per tensor decides almost always; only when some sum is not finite
    (non-finite values, or an overflow of the sum itself) is every element checked.
    """
    first = next(iter(stacks.values()))
    rows = [t.detach().flatten(1) for t in stacks.values() if t.is_floating_point()]
    rows += [t.reshape(1, -1) for t in shared.values() if t.is_floating_point()]
    ok = torch.ones(first.shape[0], dtype=torch.bool, device=first.device)
    for r in rows:
        ok &= torch.isfinite(r.sum(1)).to(ok.device)
    if bool(ok.all()):  # one device sync in the common case
        return ok.tolist()
    ok.fill_(True)
    for r in rows:
        ok &= torch.isfinite(r).all(1).to(ok.device)
    return ok.tolist()


def _copy_to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host copies of CUDA tensors, in pinned memory, *queued* on the current stream:
    read them only after synchronising the device. CPU tensors are returned as they are.
    """
    out = {}
    for name, t in tensors.items():
        if t.device.type != "cuda":
            out[name] = t
            continue
        try:
            out[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:  # page-locked memory is limited: fall back to pageable
            out[name] = torch.empty(t.shape, dtype=t.dtype)
        out[name].copy_(t, non_blocking=True)
    return out


# A client half and its clients' gradient inputs, stacked: a per-client scalar as a
# [C] tensor, a per-parameter input as a [C, ...] stack per parameter name.
StackedTerms = tuple[ClientHalf, dict[str, torch.Tensor | dict[str, torch.Tensor]]]


def _stack_terms(
    jobs: Sequence[ClientJob], names: Sequence[str], device: torch.device
) -> StackedTerms | None:
    """The jobs' gradient inputs stacked (None: no job adds a gradient term)."""
    terms = [job.terms for job in jobs]
    if terms[0] is None or not terms[0].grad:  # they all match (_terms_blocker)
        return None
    stacked: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {}
    for key, first in terms[0].grad.items():
        if isinstance(first, Mapping):
            per_param = [t.grad[key] for t in terms]
            stacked[key] = {n: torch.stack([g[n] for g in per_param]).to(device) for n in names}
        else:
            stacked[key] = torch.tensor([float(t.grad[key]) for t in terms], device=device)
    return terms[0].half, stacked


def _term(
    term: StackedTerms, name: str, p: torch.Tensor, anchor: torch.Tensor, sel: slice | torch.Tensor
) -> torch.Tensor:
    """The half's gradient term of parameter ``name`` for the clients ``sel``
    (``p``: their stacked weights); scalars shaped [G, 1, ...] to broadcast."""
    half, stacked = term
    shape = (-1,) + (1,) * (p.dim() - 1)
    inputs = {
        k: v[name][sel] if isinstance(v, dict) else v[sel].view(shape) for k, v in stacked.items()
    }
    return half.gradient(p, anchor, inputs)


def _sgd_update(
    params: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None,
    grads: dict[str, torch.Tensor],
    sel: slice | torch.Tensor,
    anchor: dict[str, torch.Tensor],
    term: StackedTerms | None,
    settings: TrainSettings,
    first_step: bool,
) -> None:
    """``torch.optim.SGD``'s update (dampening 0, no Nesterov) on stacked weights."""
    if isinstance(sel, slice):
        _sgd_update_all(params, momentum, grads, anchor, term, settings, first_step)
        return
    for name, g in grads.items():
        p = params[name][sel]
        if term is not None:
            g = g + _term(term, name, p, anchor[name], sel)
        if settings.weight_decay:
            g = g + settings.weight_decay * p
        if momentum is not None:
            buf = g if first_step else momentum[name][sel] * settings.momentum + g
            momentum[name][sel] = buf
            g = buf
        params[name][sel] = p - settings.lr * g


def _sgd_update_all(
    params: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None,
    grads: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    term: StackedTerms | None,
    settings: TrainSettings,
    first_step: bool,
) -> None:
    """:func:`_sgd_update` for a step of every client, in place.

    The multi-tensor (``_foreach``) kernels ``torch.optim.SGD`` uses on CUDA: a few
    launches per step instead of several per parameter tensor.
    """
    names = list(grads)
    weights = [params[n] for n in names]
    step = list(grads.values())
    if term is not None:
        every = slice(None)
        terms = [_term(term, n, params[n], anchor[n], every) for n in names]
        step = torch._foreach_add(step, terms)
    if settings.weight_decay:
        step = torch._foreach_add(step, weights, alpha=settings.weight_decay)
    if momentum is not None:
        bufs = [momentum[n] for n in names]
        if first_step:
            torch._foreach_copy_(bufs, step)
        else:
            torch._foreach_mul_(bufs, settings.momentum)
            torch._foreach_add_(bufs, step)
        step = bufs
    torch._foreach_add_(weights, step, alpha=-settings.lr)
