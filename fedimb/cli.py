"""``fedimb``: run, inspect, sweep and report.

Exit codes: 0 done; 1 the run failed (its summary.json says why); 2 bad input (config,
overrides, paths): one clear line, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedimb.config import (
    COMPONENT_OWN_KEYS,
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    config_changes,
    load_config,
    parse_overrides,
)
from fedimb.registry import RegistryError

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
log = logging.getLogger(__name__)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"experiment config TOML (default: {DEFAULT_CONFIG.name})",
    )
    _add_set_arg(p, "override a config key, e.g. --set loss.name=ldam-drw (repeatable)")


def _add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedimb",
        description="Federated learning under class imbalance: simulate, compare, report.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one simulation (default: configs/quickstart.toml)")
    _add_config_args(run)
    run.add_argument(
        "--out", type=Path, default=None, help="results folder (default: a new one under results/)"
    )
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint",
    )
    run.add_argument(
        "--engine", choices=["ray", "inprocess"], default=None, help="shortcut for --set engine=..."
    )
    run.add_argument(
        "--ray-address",
        default=None,
        help="run on an existing Ray cluster (shortcut for --set ray.address=...)",
    )
    run.add_argument(
        "--quiet", "-q", action="store_true", help="plain log lines instead of progress bars"
    )
    run.add_argument("--verbose", "-v", action="store_true", help="show Flower's and Ray's logs")

    parts = sub.add_parser(
        "partitions", help="show who holds what: per-client class counts and a heatmap"
    )
    _add_config_args(parts)
    parts.add_argument(
        "--png",
        type=Path,
        default=Path("partitions.png"),
        help="heatmap file (default: partitions.png)",
    )

    sweep = sub.add_parser("sweep", help="run a grid of configs (resumable) and write a report")
    sweep.add_argument("sweep_file", type=Path)
    sweep.add_argument(
        "--out", type=Path, default=None, help="sweep folder (default: results/<sweep name>)"
    )
    sweep.add_argument("--quiet", "-q", action="store_true")
    _add_set_arg(
        sweep,
        "set a config key in every cell, as the sweep file's [set] (repeatable), "
        "e.g. --set num-rounds=5",
    )
    sweep.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only the cells with this grid value (repeatable: values of one key "
        "add up, keys narrow), e.g. --only loss.name=ce --only seed=0",
    )
    _add_executor_args(sweep)

    report = sub.add_parser("report", help="rebuild tables and plots from a results folder")
    report.add_argument("results_dir", type=Path)
    report.add_argument(
        "--target-error", type=float, default=None, help="for 'rounds to reach target'"
    )

    sub.add_parser(
        "list",
        help="list the registered datasets, partitions, losses, samplers, models, strategies",
    ).add_argument(
        "table",
        nargs="?",
        choices=sorted([*LIST_TABLES, "datasets", "keys"]),
        help="show each one's parameters and their defaults, as config keys (datasets: "
        "what each is; keys: every config key, its default and meaning)",
    )
    return parser


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    overrides = parse_overrides(args.overrides)
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from fedimb.results import CONFIG_FILE, check_fresh_folder, claimed, new_run_dir
    from fedimb.sim import run_experiment

    extra: dict[str, Any] = {}
    if args.engine:
        extra["engine"] = args.engine
    if args.ray_address:
        extra["ray.address"] = args.ray_address
    if args.resume is not None:
        if not (args.resume / CONFIG_FILE).is_file():
            raise ConfigError(
                f"--resume {args.resume}: no {CONFIG_FILE} there (not a fedimb results folder)"
            )
        if args.out and args.out.resolve() != args.resume.resolve():
            raise ConfigError(f"--resume continues in {args.resume} itself; drop --out {args.out}")
        config, out, new = _resumed_config(args, extra), args.resume, False
    else:
        config = _load(args, extra)
        out = args.out or (Path(config["out-dir"]) if config["out-dir"] else None)
        new = out is None
        out = out or new_run_dir(config)
    with claimed(out, new=new):  # checked and written by this process alone
        if args.resume is not None:
            _say_where_it_continues(out, config)
        else:
            check_fresh_folder(out)
        args.run_dir = out  # for the advice if the run is interrupted
        summary = run_experiment(
            config,
            out,
            resume=args.resume is not None,
            progress=not args.quiet,
            verbose=args.verbose,
        )
        write_run_curves(out)
    print(
        f"done: final balanced error {summary['final_balanced_error']:.4f} "
        f"(best {summary['best_balanced_error']:.4f} at round {summary['best_round']}), "
        f"{summary['wall_time_s']:.1f} s; results in {out}"
    )
    return 0


def write_run_curves(out: Path) -> None:
    """The run's own curves.png (balanced and per-class error over the rounds); a
    picture that cannot be drawn is said, not fatal: the results are written."""
    from fedimb.report import plot_run_curves

    try:
        plot_run_curves(out)
    except (OSError, ValueError) as exc:
        log.warning("%s: curves.png not written (%s: %s)", out, type(exc).__name__, exc)


def _say_where_it_continues(out: Path, config: Config) -> None:
    from fedimb.preflight import check_same_defaults
    from fedimb.results import CHECKPOINT_FILE
    from fedimb.server import checkpoint_round

    check_same_defaults(out)  # before saying it continues
    checkpoint = out / CHECKPOINT_FILE
    done = checkpoint_round(checkpoint) if checkpoint.is_file() else None
    if done is not None and done < config["num-rounds"]:  # a finished run says so itself
        print(f"continuing {out} after round {done}, its checkpoint")


def _resumed_config(args: argparse.Namespace, extra: dict[str, Any]) -> Config:
    """The config of the run in ``args.resume``, which continues as configured; only
    ``--set num-rounds=N`` may change, to run more rounds from its last checkpoint."""
    from fedimb.results import CONFIG_FILE

    overrides = parse_overrides(args.overrides)
    if args.config or set(overrides) - {"num-rounds"}:
        raise ConfigError(
            "--resume continues a run exactly as configured; drop --config/--set "
            "(only --set num-rounds=N may change, to run more rounds)"
        )
    config = load_config(args.resume / CONFIG_FILE, extra)
    check_config_unedited(args.resume, config)
    if not overrides or overrides["num-rounds"] == config["num-rounds"]:
        return config
    longer = config.with_overrides(overrides)
    check_runs_on(args.resume, config, longer)
    return longer


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


def cmd_partitions(args: argparse.Namespace) -> int:
    from fedimb.data.inspect import format_counts, plot_counts_heatmap
    from fedimb.preflight import load_federation, warn_about_ignored_keys

    config = _load(args)
    warn_about_ignored_keys(config, ["partition"])  # alpha on a label-skew split, say
    fed = load_federation(config)
    print(format_counts(fed.counts, fed.dataset.classes))
    try:
        path = plot_counts_heatmap(fed.counts, fed.dataset.classes, args.png)
    except OSError as exc:  # a folder there, a read-only disk, ...
        raise ConfigError(f"--png {args.png}: cannot write the heatmap there ({exc})") from None
    print(f"heatmap: {path}")
    return 0


def _add_executor_args(sweep: argparse.ArgumentParser) -> None:
    where = sweep.add_mutually_exclusive_group()
    where.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=1,
        metavar="N",
        help="run N cells at once, each in a process of its own (in-process engine; CPU "
        "threads divided, GPUs shared or dealt round-robin); no Ray needed",
    )
    where.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the cells as Ray tasks: on a local Ray, or on the cluster at ADDRESS "
        "(auto, host:port, ray://host:port); results come back to --out here",
    )
    sweep.add_argument(
        "--cell-cpus", type=float, default=1.0, help="with --ray: CPUs per cell (default 1)"
    )
    sweep.add_argument(
        "--cell-gpus",
        type=float,
        default=None,
        help="with --ray: GPUs per cell, fractions allowed (0.33: 3 cells share a GPU); "
        "default 1 where the cluster has GPUs, else 0",
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedimb.preflight import check_same_defaults, prepare
    from fedimb.ray_engine import late_interrupt
    from fedimb.results import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE, read_json
    from fedimb.sim import run_experiment
    from fedimb.sweep import load_sweep, parse_only, run_sweep

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
    unused = _grid_keys_no_cell_takes(sweep)
    if unused:
        raise ConfigError(
            f"sweep {args.sweep_file}: no cell's component takes grid key(s) "
            f"{', '.join(unused)}, so its values would all run the same; sweep a component "
            "that takes it (partition.name, loss.name, ...) or drop the key"
        )
    once = _OncePerSweep()
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
            once.installed_on(logging.getLogger("fedimb.ray_engine")),
            once.installed_on(log),
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
    sweep: Any,
    plugins: dict[str, list[str]],
    cell_config: Any,
) -> Any:
    """What runs the cells for ``--jobs N`` / ``--ray``: a :mod:`fedimb.executors`
    executor (a context manager), or None to run them one after another here."""
    from fedimb.executors import CellJob, ProcessCells, RayCells, check_inprocess
    from fedimb.sweep import expand

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


def sweep_plugins(sweep: Any) -> dict[str, list[str]]:
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


def _grid_keys_no_cell_takes(sweep: Any) -> list[str]:
    """Grid keys of a component table that every cell's component ignores."""
    from fedimb.sweep import expand

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


class _OncePerSweep(logging.Filter):
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


def cmd_report(args: argparse.Namespace) -> int:
    from fedimb.report import build_report

    if not args.results_dir.is_dir():
        raise ConfigError(f"results folder not found: {args.results_dir}")
    try:
        built = build_report(args.results_dir, target_error=args.target_error)
    except ValueError as exc:  # e.g. a folder that holds no run
        raise ConfigError(str(exc)) from exc
    print(built["md"].read_text())
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


# `fedimb list TABLE`: the listing's word -> the config table.
LIST_TABLES = {
    "partitions": "partition",
    "losses": "loss",
    "samplers": "sampling",
    "models": "model",
    "strategies": "strategy",
}


def cmd_list(args: argparse.Namespace) -> int:
    if args.table == "keys":  # before the registries' imports (torch, Flower)
        print(key_listing())
        return 0
    import strategies
    from fedimb import losses, models, sampling
    from fedimb.data import datasets
    from fedimb.data.partition import PARTITIONERS

    if args.table == "datasets":
        print(dataset_listing())
        return 0
    if args.table:
        print(component_parameters(LIST_TABLES[args.table]))
        return 0
    for title, names in (
        ("datasets", datasets.list_datasets()),
        ("partitions", PARTITIONERS.names()),
        ("losses", losses.list_losses()),
        ("samplers", sampling.list_samplers()),
        ("models", models.list_models()),
        ("strategies", strategies.list_strategies()),
    ):
        print(f"{title}: {', '.join(names)}")
    print("each also takes your own as an import path 'package.module:attribute' (README)")
    return 0


def version_line() -> str:
    """``fedimb X (torch Y, flwr Z, Python W)``, from the installed packages' metadata
    (nothing imported)."""
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    others = ", ".join(f"{name} {version(name)}" for name in ("torch", "flwr"))
    return f"fedimb {version('fedimb')} ({others}, Python {platform.python_version()})"


def key_listing() -> str:
    """Every config key with its default and meaning; the component tables' parameters
    are in their own listings (``fedimb list losses``, ...)."""
    from fedimb.config import COMPONENT_DEFAULTS, FIXED_TABLES, TOP_LEVEL
    from fedimb.keys import MEANINGS, TABLE_MEANINGS

    def line(key: str, default: Any) -> str:
        return f"  {key.rpartition('.')[2]} = {json.dumps(default)}: {MEANINGS.get(key, '')}"

    lines = [
        "config keys = defaults: meaning (in a TOML file, or --set key=value / table.key=value)"
    ]
    lines += [line(key, field.default) for key, field in TOP_LEVEL.items()]
    for table, fields in FIXED_TABLES.items():
        lines.append(f"[{table}]")
        lines += [line(f"{table}.{key}", field.default) for key, field in fields.items()]
    words = {t: w for w, t in LIST_TABLES.items()}
    for table, default in COMPONENT_DEFAULTS.items():
        lines.append(f"[{table}]")
        lines.append(f"  name = {json.dumps(default)}: {TABLE_MEANINGS[table]}")
        for key, field in COMPONENT_OWN_KEYS.get(table, {}).items():
            lines.append(line(f"{table}.{key}", field.default))
        lines.append(f"  (each {table}'s parameters: fedimb list {words[table]})")
    return "\n".join(lines)


def dataset_listing() -> str:
    """Each registered dataset with the first line of its loader's docstring."""
    from fedimb.data import datasets

    lines = ["dataset = one of the following, or an import path 'package.module:loader':"]
    for name in datasets.list_datasets():
        doc = (datasets.DATASETS.get(name).__doc__ or "").strip().splitlines()
        text = doc[0].replace("``root", "``data-root").replace("``", "") if doc else ""
        lines.append(f"  {name}: {text}".rstrip())
    return "\n".join(lines)


def _list_notes(table: str) -> list[str]:
    """What a table's listing cannot show by itself."""
    from fedimb.losses import COSINE_SCALE

    if table == "loss":
        return [f"s unset: 1, or {COSINE_SCALE:g} on a cosine head (model.cosine-head)"]
    if table == "strategy":
        least = COMPONENT_OWN_KEYS["strategy"]["min-train-clients"].default
        return [
            f"also strategy.min-train-clients = {least}: sets min-train-nodes and "
            "min-available-nodes (either, set beside it, wins)",
            "fednova normalises by the clients' momentum: the run's momentum, not a setting",
        ]
    return []


def component_parameters(table: str) -> str:
    """Each registered component of ``table`` with its parameters, as config keys."""
    import strategies
    from fedimb.config import component_catalog, snake_to_kebab
    from strategies import REQUIRED

    def shown(value: Any) -> str:
        if value is REQUIRED:
            return "(required)"
        return "(unset)" if value is None else json.dumps(value)

    def listed(params: dict[str, Any]) -> str:
        text = ", ".join(f"{snake_to_kebab(k)} = {shown(v)}" for k, v in params.items())
        return text or "(no parameters)"

    names, defaults_of = component_catalog(table)
    params = {name: defaults_of(name) for name in names}
    if table == "strategy":  # FedNova's is the run's momentum, not a setting (a note says)
        for name in filter(strategies.follows_client_momentum, names):
            params[name].pop("momentum", None)
    shared = {
        k: v
        for k, v in params[names[0]].items()
        if all(p.get(k, REQUIRED) == v for p in params.values())
    }
    lines = [f"[{table}] name = one of the following, with its parameters (defaults):"]
    if len(names) < 2:
        shared = {}
    if shared:
        lines.append(f"  (all): {listed(shared)}")
    for name, own in params.items():
        rest = {k: v for k, v in own.items() if k not in shared}
        lines.append(f"  {name}: {listed(rest) if rest or not shared else '(all) only'}")
    lines.extend(f"  {note}" for note in _list_notes(table))
    return "\n".join(lines)


COMMANDS = {
    "run": cmd_run,
    "partitions": cmd_partitions,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "list": cmd_list,
}


# Commands that train nothing: they start without importing Flower's engines or Ray.
LIGHT_COMMANDS = frozenset({"list", "report"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in LIGHT_COMMANDS:  # no Ray here to replace the other handlers
        with _sigterm_interrupts():
            return _run_command(args)
    from fedimb.ray_engine import interrupt_handlers_kept
    from fedimb.sim import quiet_flower

    quiet_flower(verbose=getattr(args, "verbose", False))
    with interrupt_handlers_kept(), _sigterm_interrupts():
        return _run_command(args)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`) stops a command as Ctrl-C does (a run's summary says
    so); the caller's handler is put back after. Only the main thread has handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; known failures end in one line and an exit code."""
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, RegistryError) as exc:
        print(f"fedimb: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"fedimb: interrupted; {_after_interrupt(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedimb list | head`: the reader has gone, as for `ls | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE
    except Exception as exc:
        if _run_failure(exc):  # summary.json says so
            if getattr(args, "verbose", False):
                traceback.print_exception(exc)
            print(f"fedimb: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        hint = resource_hint(exc)
        if hint is None:
            raise
        print(f"fedimb: error: {type(exc).__name__}: {exc}\n  hint: {hint}", file=sys.stderr)
        return EXIT_FAILED


def _run_failure(exc: BaseException) -> bool:
    """Whether ``exc`` ended a run that recorded why (fedimb.server's errors; a command
    that never imported it ran none)."""
    server = sys.modules.get("fedimb.server")
    if server is None:
        return False
    return isinstance(exc, server.RUN_FAILURES)


def _after_interrupt(args: argparse.Namespace) -> str:
    """What to run next: the same sweep, a resume, or (nothing written yet) the run again."""
    from fedimb.results import CONFIG_FILE

    if args.command == "sweep":
        again = f"fedimb sweep {shlex.quote(str(args.sweep_file))}"
        again += f" --out {shlex.quote(str(args.out))}" if args.out else ""
        again += "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
        again += "".join(f" --only {shlex.quote(o)}" for o in args.only)
        again += f" --jobs {args.jobs}" if args.jobs != 1 else ""
        if args.ray is not None:
            again += " --ray" + (f" {shlex.quote(args.ray)}" if args.ray else "")
        return f"continue with `{again}`"
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or (run_dir / CONFIG_FILE).is_file():
        return f"continue with `fedimb run --resume {run_dir or '<results folder>'}`"
    return "it stopped before its first round and wrote nothing: run it again"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def resource_hint(exc: BaseException) -> str | None:
    """Advice for errors whose cause is the machine, not the code; None for others."""
    text = f"{type(exc).__name__}: {exc}"
    chain = exc.__cause__ or exc.__context__
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return (
            "the GPU ran out of memory: train fewer clients at once (--set group-size=16), "
            "use a smaller batch-size, or --set precision=bf16"
        )
    if isinstance(exc, OSError) and exc.errno == 28:
        return "no space left on the device: free disk space or choose --out on another disk"
    if "ray" in text.lower() and ("init" in text.lower() or "start" in text.lower()):
        return (
            "Ray failed to start: check `ray status`, free memory, or run without Ray "
            "(--engine inprocess)"
        )
    if chain is not None and chain is not exc:
        return resource_hint(chain)
    return None


if __name__ == "__main__":
    sys.exit(main())
