"""What a client does with a Flower message: all the math behind ``clients/app.py``.

The server forwards the whole flat experiment config in every train message's
``"config"`` record, so a client needs nothing but the message and its partition id
(``context.node_config["partition-id"]``): the same code runs under ``flwr run``, the
Ray simulation started by ``fedimb run``, and the in-process engine.

:func:`train_replies` handles a whole round's train messages at once: it builds every
client's job, trains them together on the device (:mod:`fedimb.batched`) when it can,
and answers each message with its own reply, as if each client had trained alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from torch import nn

import strategies
from fedimb import batched
from fedimb.algorithm import ClientHalf, ClientTerms, client_half_of
from fedimb.config import TOP_LEVEL, Config, lr_in_round, parse_id_list
from fedimb.federation import (
    Federation,
    get_federation,
    init_model,
    loss_kwargs,
    model_kwargs,
    use_augmentation,
)
from fedimb.losses import make_loss
from fedimb.protocol import (
    CLASS_COUNTS_KEY,
    NUM_STEPS_KEY,
    OPTIMIZER_STATE,
    carried_state,
    state_entries,
)
from fedimb.records import record_of, state_record
from fedimb.train import (
    ClientJob,
    TrainResult,
    TrainSettings,
    client_rng,
    evaluate_counts,
    make_plan,
    train_client,
)

log = logging.getLogger(__name__)

CLIENT_ERROR_CODE = 1


class InjectedFault(RuntimeError):
    """Raised by a client told to fail by the test-only ``[faults]`` table."""


# ------------------------------------------------------------------------ config


_CONFIGS: dict[str, Config] = {}


def config_from_message(msg: Message) -> Config:
    """The experiment config carried by a train/evaluate message (validated once per process)."""
    record = msg.content["config"]
    flat = {k: v for k, v in record.items() if k in TOP_LEVEL or "." in k}
    key = json.dumps(flat, sort_keys=True)
    if key not in _CONFIGS:
        _CONFIGS[key] = Config.from_flat(flat)
    return _CONFIGS[key]


def train_settings(config: Config, fed: Federation, server_round: int) -> TrainSettings:
    """Local-training hyperparameters of a run's round ``server_round``."""
    return TrainSettings(
        epochs=config["local-epochs"],
        batch_size=config["batch-size"],
        lr=lr_in_round(config, server_round),
        momentum=config["momentum"],
        weight_decay=config["weight-decay"],
        augment=use_augmentation(config, fed),
        bf16=config["precision"] == "bf16",
        channels_last=config["channels-last"],
        cudnn_benchmark=config["cudnn-benchmark"],
        keep_optimizer_state=config["optimizer-state"] == "keep",
    )


_MODELS: dict[str, nn.Module] = {}
_WARNED: set[str] = set()


def model_for(config: Config, fed: Federation) -> nn.Module:
    """A process-wide instance of the run's architecture on the training device."""
    key = json.dumps(
        [
            config.model.name,
            model_kwargs(config),
            str(fed.device),
            fed.dataset.input_shape,
            fed.num_classes,
        ]
    )
    if key not in _MODELS:
        _MODELS[key] = init_model(config, fed).to(fed.device)
    return _MODELS[key]


# -------------------------------------------------------------------------- jobs


_HALVES: dict[str, ClientHalf | None] = {}


def client_half(config: Config) -> ClientHalf | None:
    """The client half of the run's strategy (:mod:`fedimb.algorithm`), or None."""
    name = config.strategy.name
    if name not in _HALVES:  # the class only: the strategy is the server's to build
        _HALVES[name] = client_half_of(strategies.resolve_strategy(name))
    return _HALVES[name]


def build_job(
    config: Config,
    fed: Federation,
    pid: int,
    msg: Message,
    context: Context,
    settings: TrainSettings,
    global_params: Mapping[str, torch.Tensor],
) -> ClientJob:
    """One client's job for this round: its data, its loss from its own counts, its plan,
    and what the algorithm's client half adds (``global_params``: on the device)."""
    nodes = context.node_config.get("num-partitions", config["num-clients"])
    if int(nodes) != config["num-clients"]:
        raise ValueError(
            f"the federation has {nodes} nodes but num-clients = {config['num-clients']}: "
            f'under `flwr run`, pass --federation-config "num-supernodes={config["num-clients"]}"'
        )
    server_round = int(msg.content["config"]["server-round"])
    x, y = fed.client_tensors(pid)
    loss = make_loss(
        config.loss.name,
        fed.counts[pid],
        server_round=server_round,
        num_rounds=config["num-rounds"],
        **loss_kwargs(config),
    )
    plan = make_plan(
        fed.client_labels(pid),
        settings,
        client_rng(config["seed"], server_round, pid),
        sampler=config.sampling.name,
        server_round=server_round,
        num_rounds=config["num-rounds"],
        **config.sampling.kwargs(),
    )
    half = client_half(config)
    terms = (
        None if half is None else half.prepare(msg.content, context.state, global_params, settings)
    )
    return ClientJob(
        x=x,
        y=y,
        loss=loss,
        plan=plan,
        terms=terms,
        momentum=_kept_momentum(context, settings, fed.device),
    )


def _kept_momentum(
    context: Context, settings: TrainSettings, device: torch.device
) -> dict[str, torch.Tensor] | None:
    """The momentum buffers this client kept from its last round (None: none, or the run
    resets them)."""
    record = record_of(context.state, OPTIMIZER_STATE, ArrayRecord)
    if record is None or not settings.keep_optimizer_state:
        return None
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}


def _inject_faults(config: Config, pid: int, server_round: int, result: TrainResult) -> float:
    """Test-only faults from the ``[faults]`` table; returns the seconds it slept."""
    rounds = parse_id_list(config["faults.rounds"])
    if rounds and server_round not in rounds:
        return 0.0
    slept = 0.0
    if pid in parse_id_list(config["faults.slow-clients"]):
        slept = config["faults.slow-s"]
        time.sleep(slept)
    if pid in parse_id_list(config["faults.raise-clients"]):
        raise InjectedFault(f"client {pid}: injected failure in round {server_round}")
    if pid in parse_id_list(config["faults.nan-clients"]):
        first = next(k for k, v in result.state.items() if v.is_floating_point())
        result.state[first] = torch.full_like(result.state[first], float("nan"))
        result.loss = float("nan")
        result.finite = None
    return slept


def make_reply(
    msg: Message,
    context: Context,
    terms: ClientTerms | None,
    result: TrainResult,
    pid: int,
    settings: TrainSettings,
    global_params: Mapping[str, torch.Tensor],
    seconds: float,
    class_counts: Sequence[int] = (),
) -> Message:
    """The train reply: weights, metrics (``class_counts``: the client's training samples
    per class, for strategies that weigh by class), and what the client half adds."""
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        NUM_STEPS_KEY: result.num_steps,
        "partition-id": pid,
        "train-seconds": seconds,
        CLASS_COUNTS_KEY: [int(c) for c in class_counts],
    }
    records: dict[str, Any] = {}
    if terms is not None:
        extra = terms.half.finish(terms, global_params, result, settings, context.state)
        metrics.update(extra.metrics)
        records = extra.records
    content = RecordDict(
        {
            "arrays": state_record(result.state, finite=result.finite),
            "metrics": MetricRecord(metrics),
            **records,
        }
    )
    if result.momentum is not None:  # optimizer-state = "keep"
        context.state[OPTIMIZER_STATE] = state_record(result.momentum)
    # The server keeps the latest copy for its checkpoints: under Ray, the clients'
    # contexts live in Flower's engine, out of the server's reach.
    content.update(state_entries(context.state))  # not ``array_records``: a cyclic view
    return Message(content, reply_to=msg)


def error_reply(msg: Message, exc: BaseException) -> Message:
    """A Flower error reply: the strategy counts it as a failure and goes on."""
    return Message(
        Error(code=CLIENT_ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg
    )


# ------------------------------------------------------------------------ handlers


def global_weights(msg: Message, model: nn.Module) -> dict[str, torch.Tensor]:
    """The message's global model, in the model's own dtypes and device.

    Server-side aggregation may hand back float64 weights and float integer buffers
    (e.g. BatchNorm's step counter); training works on the model's own dtypes.
    """
    own = model.state_dict()
    return {
        k: v.to(device=own[k].device, dtype=own[k].dtype)
        for k, v in msg.content["arrays"].to_torch_state_dict().items()
    }


def train_replies(
    messages: Sequence[Message], contexts: Sequence[Context], *, batched_ok: bool = True
) -> list[Message]:
    """Train every client of ``messages`` and return one reply each, in order.

    Messages that carry the same global model and config (Flower's strategies send one
    shared record to every sampled node) are trained together on the device when the
    config, model and losses allow (``batched`` = auto/on), else one at a time. A strategy
    that sends different models to different clients gets one group per model. A client
    whose setup or training raises gets an error reply; the others are unaffected.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, msg in enumerate(messages):
        key = (id(msg.content["arrays"]), id(msg.content["config"]))
        groups.setdefault(key, []).append(i)
    replies: list[Message] = [None] * len(messages)  # type: ignore[list-item]
    for members in groups.values():
        group_replies = _train_group(
            [messages[i] for i in members], [contexts[i] for i in members], batched_ok
        )
        for i, reply in zip(members, group_replies, strict=True):
            replies[i] = reply
    return replies


def _train_group(
    messages: Sequence[Message], contexts: Sequence[Context], batched_ok: bool
) -> list[Message]:
    """:func:`train_replies` for messages that share one global model and config."""
    replies: list[Message | None] = [None] * len(messages)
    jobs: dict[int, ClientJob] = {}
    first = messages[0]
    config = config_from_message(first)
    fed = get_federation(config)
    model = model_for(config, fed)
    global_state = global_weights(first, model)
    settings = train_settings(config, fed, int(first.content["config"]["server-round"]))
    pids = [int(c.node_config["partition-id"]) for c in contexts]
    global_params = {n: global_state[n] for n, _ in model.named_parameters()}
    for i, (msg, ctx) in enumerate(zip(messages, contexts, strict=True)):
        try:
            jobs[i] = build_job(config, fed, pids[i], msg, ctx, settings, global_params)
        except Exception as exc:
            replies[i] = error_reply(msg, exc)

    order = list(jobs)
    results: dict[int, tuple[TrainResult, float]] = {}
    mode = config["batched"]
    asked = (  # they could train together, and the setting asks for it on this device
        batched_ok and len(order) > 1 and batched.asked(mode, model, jobs[order[0]].x.device)
    )
    reason = (
        batched.can_batch(model, [jobs[i] for i in order], fed.dataset.to_float) if asked else None
    )
    use_batch = asked and reason is None  # None: the model and losses are vectorisable
    if asked and reason is not None and reason not in _WARNED:
        _WARNED.add(reason)  # once per process, not every round
        log.warning("batched = %r but clients train one at a time: %s", mode, reason)
    if use_batch:
        size = config["group-size"] or len(order)
        for start in range(0, len(order), size):
            group = order[start : start + size]
            t0 = time.perf_counter()
            out = batched.train_clients(
                model, global_state, [jobs[i] for i in group], fed.dataset.to_float, settings
            )
            per_client = (time.perf_counter() - t0) / len(group)
            results.update({i: (r, per_client) for i, r in zip(group, out, strict=True)})
    for i in order:
        msg, server_round = messages[i], int(messages[i].content["config"]["server-round"])
        try:
            if i not in results:
                t0 = time.perf_counter()
                model.load_state_dict(global_state)
                result = train_client(model, jobs[i], fed.dataset.to_float, settings)
                results[i] = (result, time.perf_counter() - t0)
            result, seconds = results[i]
            seconds += _inject_faults(config, pids[i], server_round, result)
            replies[i] = make_reply(
                msg,
                contexts[i],
                jobs[i].terms,
                result,
                pids[i],
                settings,
                global_params,
                seconds,
                class_counts=fed.counts[pids[i]],
            )
        except Exception as exc:
            replies[i] = error_reply(msg, exc)
    return replies  # type: ignore[return-value]


def handle_train(msg: Message, context: Context) -> Message:
    """The ClientApp's ``@app.train()``: one client, one message."""
    return train_replies([msg], [context], batched_ok=False)[0]


def local_test_indices(fed: Federation, pid: int) -> np.ndarray:
    """Client ``pid``'s share of the test set: the test samples of the classes it holds,
    each class split evenly among the clients holding it (its local test distribution)."""
    y_test = fed.dataset.y_test.numpy()
    share = []
    for cls in np.flatnonzero(fed.counts[pid]):
        holders = np.flatnonzero(fed.counts[:, cls])
        rank = int(np.searchsorted(holders, pid))
        share.append(np.array_split(np.flatnonzero(y_test == cls), len(holders))[rank])
    return np.concatenate(share) if share else np.empty(0, dtype=np.int64)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """The ClientApp's ``@app.evaluate()``: per-class counts on the client's test share."""
    config = config_from_message(msg)
    fed = get_federation(config)
    pid = int(context.node_config["partition-id"])
    model = model_for(config, fed)
    model.load_state_dict(global_weights(msg, model))
    x_test, y_test = fed.test_tensors()
    idx = torch.as_tensor(local_test_indices(fed, pid), device=fed.device)
    correct, total = evaluate_counts(
        model,
        x_test[idx],
        y_test[idx],
        fed.num_classes,
        fed.dataset.to_float,
        config["eval-batch-size"],
    )
    metrics = MetricRecord(
        {
            "num-examples": int(total.sum()),
            "correct-per-class": [int(v) for v in correct],
            "count-per-class": [int(v) for v in total],
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """The ClientApp's ``@app.query()``: the partition this node simulates.

    Under Ray, Flower gives the nodes random ids; the server asks each node once and
    lists them in partition order, so a seeded sample picks the same clients every run.
    A resumed run's server also sends each client the persistent state (records under
    ``STATE_PREFIX``) that its checkpoint saved; the client takes it as its own.
    """
    pid = int(context.node_config["partition-id"])
    for name, record in carried_state(msg.content).items():
        context.state[name] = record
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def experiment_record(config: Config) -> ConfigRecord:
    """The train config the server sends: the whole flat experiment config."""
    return ConfigRecord(config.to_flat())
