"""What ``fedimb sweep`` does once its arguments are parsed: each cell's config read and
checked once, the checks of every cell before any runs, the choice of executor
(``--jobs`` / ``--ray``), warnings said once per sweep, and the final tally."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedimb.cli import EXIT_FAILED
from fedimb.config import Config, ConfigError, config_changes, load_config, parse_overrides
from fedimb.resume import check_runs_on
from fedimb.sweep.spec import Sweep, expand, load_sweep, parse_only


def run_sweep_command(args: argparse.Namespace) -> int:
    """``fedimb sweep``: check every cell, run them (here, in ``--jobs`` processes or on
    ``--ray``), print the tally; the exit code (1 when a cell failed)."""
    from fedimb.engines.ray import late_interrupt
    from fedimb.preflight import check_same_defaults, prepare
    from fedimb.results import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE, read_json
    from fedimb.sim import run_experiment
    from fedimb.sweep.runner import run_sweep

    try:
        sweep = load_sweep(args.sweep_file)
        only = parse_only(args.only, sweep)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"sweep {args.sweep_file}: {exc}") from exc
    extra = parse_overrides(args.overrides)
    swept = sorted(set(extra) & set(sweep.grid))
    if swept:
        raise ConfigError(f"--set {', '.join(swept)}: swept in the [grid] of {args.sweep_file}")
    sweep = dataclasses.replace(sweep, fixed={**sweep.fixed, **extra})
    out = args.out or Path("results") / sweep.name
    plugins = sweep_plugins(sweep)
    unused = grid_keys_no_cell_takes(sweep)
    if unused:
        raise ConfigError(
            f"sweep {args.sweep_file}: no cell's component takes grid key(s) "
            f"{', '.join(unused)}, so its values would all run the same; sweep a component "
            "that takes it (partition.name, loss.name, ...) or drop the key"
        )
    once = OncePerSweep()
    configs: dict[str, Config] = {}

    def cell_config(overrides: dict[str, Any]) -> Config:
        # Read and checked once: the sweep asks to validate, to skip and to run a cell.
        key = json.dumps(overrides, sort_keys=True)
        if key not in configs:
            configs[key] = load_config(sweep.base, overrides, plugins=plugins)
        return configs[key]

    def validate_cell(overrides: dict[str, Any], cell_dir: Path) -> None:
        once.cell = cell_dir.name
        config = cell_config(overrides)
        prepare(config)  # data + partition too, before any cell runs
        if (cell_dir / CONFIG_FILE).is_file():  # a cell run (or begun) earlier
            check_same_defaults(cell_dir)
            began = load_config(cell_dir / CONFIG_FILE)
            # data-root says where the data is on this machine, not which data it is.
            changed = config_changes(began, config, ignore={"num-rounds", "data-root"})
            if changed:
                raise ConfigError(
                    f"{cell_dir} holds a run of another config ({changed}); sweep into "
                    "another --out, or delete that folder to run the cell again"
                )
            if began["num-rounds"] != config["num-rounds"]:  # runs on from its checkpoint
                check_runs_on(cell_dir, began, config, start_over=True)

    def is_done(overrides: dict[str, Any], cell_dir: Path) -> bool:
        summary = read_json(cell_dir / SUMMARY_FILE) or {}
        wanted = cell_config(overrides)["num-rounds"]
        return summary.get("status") == "completed" and summary.get("rounds_completed", 0) >= wanted

    def run_cell(overrides: dict[str, Any], cell_dir: Path) -> None:
        # A cell interrupted earlier continues from its checkpoint; quiet sweeps print per cell.
        once.cell = cell_dir.name
        run_experiment(
            cell_config(overrides),
            cell_dir,
            resume=(cell_dir / CHECKPOINT_FILE).exists(),
            progress=None if args.quiet else True,
            label=cell_dir.name,
        )

    late_interrupt()  # forget one that reached an earlier Ray run of this process
    executor = sweep_executor(args, sweep, plugins, cell_config)  # None: in turn, here
    try:
        with (
            once.installed_on(logging.getLogger("fedimb.preflight")),
            once.installed_on(logging.getLogger("fedimb.engines.ray")),
            once.installed_on(logging.getLogger("fedimb.resume")),
            executor or contextlib.nullcontext(),
        ):
            results = run_sweep(
                sweep,
                out,
                executor.run_cell if executor else run_cell,
                validate_cell=validate_cell,
                is_done=is_done,
                progress=not args.quiet,
                stop_requested=late_interrupt,  # Ctrl-C while Ray shut a cell's run down
                only=only,
                each=executor.each if executor else map,
            )
    except ValueError as exc:
        if isinstance(exc, ConfigError) or "cell" in str(exc):
            raise ConfigError(str(exc)) from exc
        raise
    failed = [r for r in results if r.status == "failed"]
    elsewhere = sum(r.status == "running elsewhere" for r in results)
    print(
        f"sweep: {len(results) - len(failed) - elsewhere} cells completed, {len(failed)} failed"
        + (f", {elsewhere} running in another process" if elsewhere else "")
        + f"; report in {out}"
    )
    return EXIT_FAILED if failed else 0


def sweep_executor(
    args: argparse.Namespace,
    sweep: Sweep,
    plugins: dict[str, list[str]],
    cell_config: Any,
) -> Any:
    """What runs the cells for ``--jobs N`` / ``--ray``: a :mod:`fedimb.sweep.executors`
    executor (a context manager), or None to run them one after another here."""
    from fedimb.sweep.executors import CellJob, check_inprocess
    from fedimb.sweep.processes import ProcessCells
    from fedimb.sweep.ray_cells import RayCells

    if args.ray is None and args.jobs == 1:
        if args.cell_cpus != 1.0 or args.cell_gpus is not None:
            raise ConfigError("--cell-cpus and --cell-gpus size Ray tasks: add --ray")
        return None
    engines = {}
    for cell in expand(sweep):
        with contextlib.suppress(ConfigError):  # the cells' validation names what is wrong
            engines[cell.name] = cell_config(cell.overrides)["engine"]
    how = "--ray" if args.ray is not None else f"--jobs {args.jobs}"
    check_inprocess(engines, how)
    job = CellJob(str(sweep.base), plugins)

    def rounds_of(overrides: dict[str, Any]) -> int:
        return cell_config(overrides)["num-rounds"]

    if args.ray is None:
        return ProcessCells(args.jobs, job, rounds_of, progress=not args.quiet)
    return RayCells(
        args.ray,
        job,
        rounds_of,
        cell_cpus=args.cell_cpus,
        cell_gpus=args.cell_gpus,
        progress=not args.quiet,
    )


def sweep_plugins(sweep: Sweep) -> dict[str, list[str]]:
    """Per component table, the plug-ins (import paths) the sweep's cells use: a table
    shared by the cells may carry their parameters, as it may other components'."""
    from fedimb.registry import is_import_path

    found: dict[str, list[str]] = {}
    pairs = [*sweep.fixed.items(), *((k, v) for k, vs in sweep.grid.items() for v in vs)]
    for key, value in pairs:
        table, _, leaf = key.partition(".")
        if leaf == "name" and isinstance(value, str) and is_import_path(value):
            found.setdefault(table, []).append(value)
    return found


def grid_keys_no_cell_takes(sweep: Sweep) -> list[str]:
    """Grid keys of a component table that every cell's component ignores."""

    taken: set[str] = set()
    plugins = sweep_plugins(sweep)
    for cell in expand(sweep):
        try:
            config = load_config(sweep.base, cell.overrides, plugins=plugins)
        except ConfigError:
            return []  # the cells' own validation names what is wrong
        ignored = {f"{t}.{k}" for t, c in config.components.items() for k in c.ignored}
        taken |= set(cell.overrides) - ignored
    return [key for key in sweep.grid if key not in taken]


class OncePerSweep(logging.Filter):
    """Let each distinct message through once, naming the sweep cell it first came from.

    A sweep checks every cell before it runs any, so each cell's warnings about its
    partition or device come up front; the cell's run would repeat them word for word.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cell = ""
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self._seen:
            return False
        self._seen.add(text)
        record.msg, record.args = f"{self.cell}: {text}", ()
        return True

    @contextlib.contextmanager
    def installed_on(self, logger: logging.Logger) -> Iterator[None]:
        logger.addFilter(self)
        try:
            yield
        finally:
            logger.removeFilter(self)
