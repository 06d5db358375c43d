"""``fedimb``: run, inspect, sweep and report.

Exit codes: 0 done; 1 the run failed (its summary.json says why); 2 bad input (config,
overrides, paths): one clear line, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
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
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    load_config,
    parse_overrides,
)
from fedimb.engines import engine_names
from fedimb.listing import LIST_TABLES, version_line
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
        "--engine", choices=engine_names(), default=None, help="shortcut for --set engine=..."
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
    from fedimb.resume import check_config_unedited, check_runs_on

    config = load_config(args.resume / CONFIG_FILE, extra)
    check_config_unedited(args.resume, config)
    if not overrides or overrides["num-rounds"] == config["num-rounds"]:
        return config
    longer = config.with_overrides(overrides)
    check_runs_on(args.resume, config, longer)
    return longer


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
    from fedimb.sweep.command import run_sweep_command

    return run_sweep_command(args)


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


def cmd_list(args: argparse.Namespace) -> int:
    from fedimb import listing

    if args.table == "keys":
        print(listing.key_listing())
    elif args.table == "datasets":
        print(listing.dataset_listing())
    elif args.table:
        print(listing.component_parameters(LIST_TABLES[args.table]))
    else:
        print(listing.names_listing())
    return 0


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
    from fedimb.engines.ray import interrupt_handlers_kept
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
