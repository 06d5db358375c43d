"""Continuing a run from its checkpoint: the checks that make ``fedimb run --resume``
and a sweep's cell that runs on for more rounds refuse what would mix two runs."""

from __future__ import annotations

import logging
from pathlib import Path

from fedimb.config import Config, ConfigError

log = logging.getLogger(__name__)


def check_config_unedited(run_dir: Path, config: Config) -> None:
    """Refuse to continue the run in ``run_dir`` when its config.toml (``config``) no
    longer says what its checkpoint was trained under (edited by hand), as a sweep
    refuses a cell folder of another config; num-rounds may differ (see check_runs_on)."""
    from fedimb.config import flat_changes
    from fedimb.results import CHECKPOINT_FILE, CONFIG_FILE
    from fedimb.server import checkpoint_config

    checkpoint = run_dir / CHECKPOINT_FILE
    saved = checkpoint_config(checkpoint) if checkpoint.is_file() else None
    if not saved:  # nothing to continue from, or a checkpoint from before it kept its config
        return
    now = config.to_flat()
    changed = flat_changes(saved, {k: now.get(k) for k in saved}, ignore={"num-rounds"})
    if changed:
        raise ConfigError(
            f"{run_dir / CONFIG_FILE} differs from the config its checkpoint was trained "
            f"under ({changed}): --resume continues a run as it began; undo the edit, or "
            f"start a new run with --config {run_dir / CONFIG_FILE} --out <another folder>"
        )


def check_runs_on(
    run_dir: Path, config: Config, longer: Config, *, start_over: bool = False
) -> None:
    """Refuse to continue the run in ``run_dir`` (``config``) to ``longer``'s num-rounds
    where it cannot: fewer rounds than it has run, or rounds run but no checkpoint
    (unless ``start_over``: a sweep's cell then runs again from round 0, said in a
    warning). Warn when a schedule counts in fractions of num-rounds, since its rounds
    move."""
    from fedimb.results import CHECKPOINT_FILE, SUMMARY_FILE, read_json
    from fedimb.server import checkpoint_round

    rounds = f"num-rounds {config['num-rounds']} -> {longer['num-rounds']}"
    checkpoint = run_dir / CHECKPOINT_FILE
    saved = checkpoint.is_file()
    if saved:
        done = checkpoint_round(checkpoint)
    else:
        done = int((read_json(run_dir / SUMMARY_FILE) or {}).get("rounds_completed") or 0)
    if longer["num-rounds"] < done:
        raise ConfigError(
            f"{run_dir}: {rounds}: the run has reached round {done}; give at least that many"
        )
    if not saved:  # it runs again from round 0
        if done and not start_over:
            raise ConfigError(f"{run_dir}: {rounds}: no checkpoint there to continue from")
        if done:
            log.warning("%s: %s: no checkpoint to continue from: it runs again", run_dir, rounds)
        return
    moved = round_fractions(config)
    if moved:
        log.warning(
            "%s: %s count in fractions of num-rounds, so their rounds move for the rounds after %d",
            rounds,
            ", ".join(moved),
            done,
        )


def round_fractions(config: Config) -> list[str]:
    """The config's schedules given as fractions of num-rounds (DRW, DRS, lr milestones)."""
    from fedimb.losses import list_losses, loss_defaults
    from fedimb.sampling import sampler_params

    loss = config.loss
    loss_params = loss_defaults(loss.name) if loss.name in list_losses() else {}
    loss_params.update(loss.kwargs())
    sampling_params = {**sampler_params(config.sampling.name), **config.sampling.kwargs()}
    found = []
    if isinstance(loss_params.get("drw_start"), float):
        found.append("loss.drw-start")
    if isinstance(sampling_params.get("drs_start"), float):
        found.append("sampling.drs-start")
    if "." in config["lr-schedule.milestones"]:
        found.append("lr-schedule.milestones")
    return found
