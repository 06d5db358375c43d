"""Checks before a run: everything that can be wrong with the config or the data is
found here, before the engine starts (and before a sweep runs any cell).

:func:`prepare` loads the data and builds the partition, the model, one client's loss and
sampler; the ``warn_about_*`` functions say when a setting changes nothing or the split is
not what the config suggests; :func:`check_same_defaults` refuses to continue a run begun
under other defaults.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimb.config import FIXED_TABLES, Config, ConfigError, declares, snake_to_kebab
from fedimb.data.datasets import BUNDLED_DATASETS
from fedimb.data.partition import partition_params
from fedimb.engines import get_engine
from fedimb.federation import Federation, loss_kwargs
from fedimb.loggers import check_loggers

log = logging.getLogger(__name__)


def load_federation(config: Config) -> Federation:
    """The config's data and partition; what cannot be built is a :class:`ConfigError`."""
    from fedimb.federation import get_federation

    try:
        fed = get_federation(config)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from exc
    warn_about_partition(config, fed)
    return fed


def warn_about_settings(config: Config) -> None:
    """Say when a key the config sets, or a default it keeps, changes nothing."""
    import strategies

    warn_about_ignored_keys(config, config.components)
    inert = strategies.trains_as_fedavg(config.strategy.name, config.strategy_kwargs())
    if inert and inert[0] not in config.strategy.kwargs():  # not a baseline set on purpose
        key = snake_to_kebab(inert[0])
        log.warning(
            "strategy %r with %s = %g trains exactly as fedavg: set strategy.%s",
            config.strategy.name,
            key,
            inert[1],
            key,
        )
    _warn_about_plugins(config)
    drops = bool(config["lr-schedule.milestones"].strip())
    gamma_default = FIXED_TABLES["lr-schedule"]["gamma"].default
    if not drops and config["lr-schedule.gamma"] != gamma_default:
        log.warning("lr-schedule.gamma is ignored: lr-schedule.milestones is empty")
    if config["data-root"] and config["dataset"] in BUNDLED_DATASETS:
        log.warning("data-root is ignored: dataset %r needs no files", config["dataset"])
    # A strategy's own rules, declared beside it: an optional check_config classmethod.
    check = getattr(strategies.resolve_strategy(config.strategy.name), "check_config", None)
    for line in check(config) if check is not None else ():
        log.warning("%s", line)


def warn_about_ignored_keys(config: Config, tables: Iterable[str]) -> None:
    """Name each key of these component tables that their chosen component does not take
    (kept for another component of the table), where the user set it with the component:
    not a file's key for the file's own component that ``--set`` replaced."""
    for table in tables:
        component = config.components[table]
        for key in sorted(component.ignored):
            if not set_with_its_component(config, table, key):
                continue
            log.warning(
                "%s.%s is ignored: %s %r does not take it", table, key, table, component.name
            )


def set_with_its_component(config: Config, table: str, key: str) -> bool:
    """Whether ``table.key`` was set with the table's ``name``: both by the file, or the
    key by an override (``--set partition.name=dirichlet`` leaves the base file's
    ``classes-per-client`` behind without the user asking for it)."""
    overridden = config.overridden
    return f"{table}.{key}" in overridden or f"{table}.name" not in overridden


def _warn_about_plugins(config: Config) -> None:
    """A plug-in model without a cosine head under LDAM, or a plug-in loss without a
    logit scale on one: what a built-in would get, it cannot."""
    from fedimb.federation import model_kwargs
    from fedimb.losses import COSINE_HEAD_LOSSES, COSINE_SCALE

    model, loss = config.model.name, config.loss.name
    if (
        loss in COSINE_HEAD_LOSSES
        and "cosine-head" not in config.model.params
        and not declares("model", model, "cosine-head")
    ):
        log.warning(
            "loss %r turns model.cosine-head on, but model %r takes no cosine_head: LDAM's "
            "margins act on its unnormalised logits",
            loss,
            model,
        )
    cosine = model_kwargs(config).get("cosine_head", False)
    if cosine and "s" not in config.loss.params and not declares("loss", loss, "s"):
        log.warning(
            "loss %r takes no s: on a cosine head (model.cosine-head) its logits lie in "
            "[-1, 1], where the built-in losses get s = %g; give its factory an s parameter",
            loss,
            COSINE_SCALE,
        )


def warn_about_partition(config: Config, fed: Federation) -> None:
    """Say before a run, not after, when the split is not what its config suggests."""
    unheld = np.flatnonzero(fed.counts.sum(axis=0) == 0)
    if unheld.size:  # their test error stays 1
        names = ", ".join(str(fed.dataset.classes[c]) for c in unheld)
        log.warning("no client holds class(es) %s: the global model never trains on them", names)
    if config.partition.name == "label-skew":
        # A class with fewer samples than the clients drawn to share it (a long tail's
        # rare classes) leaves some of them without it.
        wanted = {**partition_params("label-skew"), **config.partition.kwargs()}
        short = np.flatnonzero((fed.counts > 0).sum(axis=1) < wanted["classes_per_client"])
        if short.size:
            shown = ", ".join(map(str, short[:10])) + (", ..." if short.size > 10 else "")
            log.warning(
                "%d client(s) hold fewer than %d classes (%s): a rare class has fewer samples "
                "than the clients drawn to share it",
                short.size,
                wanted["classes_per_client"],
                shown,
            )


def prepare(config: Config) -> None:
    """Load the data and build the partition, the model, one client's loss and sampler
    now, so bad input fails before Ray starts (and before a sweep runs any cell)."""
    from fedimb.client import model_for
    from fedimb.losses import make_loss
    from fedimb.sampling import epoch_indices

    get_engine(config["engine"]).check(config)
    warn_about_settings(config)
    check_loggers(config)
    fed = load_federation(config)
    if fed.device.type != "cuda":
        if config["precision"] != "fp32":
            log.warning(
                "precision = %r applies on CUDA only: this run is fp32", config["precision"]
            )
        if config["cudnn-benchmark"]:
            log.warning("cudnn-benchmark applies on CUDA only: it changes nothing here")

    with _component_errors(config, "model"):  # a model that does not fit the data
        logits, labels = _sample_logits(model_for(config, fed), fed)
    check_vectorisable(config, fed, model_for(config, fed))
    with _component_errors(config, "loss"):  # a parameter that fails on the real counts
        loss = make_loss(
            config.loss.name,
            fed.counts[0],
            server_round=1,
            num_rounds=config["num-rounds"],
            **loss_kwargs(config),
        )
        _check_loss_value(loss(logits, labels))
    with _component_errors(config, "sampling"):  # e.g. a drs-start after the last round
        epoch_indices(
            config.sampling.name,
            np.repeat(np.arange(fed.num_classes), fed.counts[0]),
            np.random.default_rng(0),
            server_round=1,
            num_rounds=config["num-rounds"],
            **config.sampling.kwargs(),
        )


def check_vectorisable(config: Config, fed: Federation, model: torch.nn.Module) -> None:
    """Decide before round 1 whether the in-process engine's clients train together:
    ``batched = "on"`` with a model that cannot is a :class:`ConfigError`; ``"auto"``
    says once that they train one at a time (the clients then do not say it again)."""
    from fedimb import batched, client

    mode = config["batched"]
    if config["engine"] != "inprocess" or not batched.asked(mode, model, fed.device):
        return
    x = fed.dataset.x_train[torch.as_tensor(fed.parts[0][:2])].to(fed.device)
    reason = batched.model_blocker(model, x, fed.dataset.to_float)
    if reason is None:
        return
    if mode == "on":
        raise ConfigError(
            f"batched = 'on' but model {config.model.name!r} cannot train clients together: "
            f"{reason}; set batched = 'auto' or 'off' to train them one at a time"
        )
    client._WARNED.add(reason)
    log.warning("batched = %r but clients train one at a time: %s", mode, reason)


def _sample_logits(model: torch.nn.Module, fed: Federation) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits for two of client 0's samples (in eval mode, no gradient) and
    their labels, checked to be ``[batch, num_classes]``: a wrong head fails here, in
    one line, not inside every client's first step."""
    idx = torch.as_tensor(fed.parts[0][:2])  # the partition gave client 0 samples
    x, y = fed.dataset.x_train[idx].to(fed.device), fed.dataset.y_train[idx].to(fed.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(fed.dataset.to_float(x))
    finally:
        model.train(training)
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
    if shape != (len(y), fed.num_classes):
        got = f"shape {list(shape)}" if shape is not None else f"a {type(logits).__name__}"
        raise ValueError(
            f"it returned {got} for {len(y)} samples of {fed.num_classes} classes; a model "
            f"must return logits of shape [batch, num_classes] = [{len(y)}, {fed.num_classes}]"
        )
    return logits.float(), y


def _check_loss_value(value: Any) -> None:
    """A loss must return the batch's loss as one number in a tensor (to backpropagate)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"it returned a {type(value).__name__}; a loss must return a tensor")
    if value.numel() != 1:
        raise ValueError(
            f"it returned a tensor of shape {list(value.shape)}; a loss must return one "
            "number (e.g. the batch's mean), not one per sample"
        )


@contextlib.contextmanager
def _component_errors(config: Config, table: str) -> Iterator[None]:
    """A component's ValueError or TypeError (a plug-in's error of any type: the user's
    own code) as one line naming it."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        if not config.raised_by(table, exc):
            raise
        raise config.component_error(table, exc) from exc


def check_same_defaults(out_dir: str | Path) -> None:
    """Refuse to continue a run that began under other defaults (``DEFAULTS_VERSION``)."""
    from fedimb.results import CHECKPOINT_FILE, DEFAULTS_VERSION, SUMMARY_FILE, read_json

    summary = read_json(Path(out_dir) / SUMMARY_FILE)
    if summary is None:  # written before round 1: gone since, or the run never began
        if (Path(out_dir) / CHECKPOINT_FILE).exists():
            raise ConfigError(
                f"{out_dir} has a checkpoint but no {SUMMARY_FILE}, so the fedimb defaults "
                "it began under are unknown: run it again in another folder (or delete its "
                f"{CHECKPOINT_FILE} to start it over)"
            )
        return
    began = summary.get("defaults", 1)
    if began != DEFAULTS_VERSION:
        raise ConfigError(
            f"{out_dir} began under fedimb's defaults {began}, this version has "
            f"{DEFAULTS_VERSION} (see DEFAULTS_VERSION in fedimb/results.py): continuing it "
            "would mix the two; run it again in another folder"
        )
