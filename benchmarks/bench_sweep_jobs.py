"""Cells per minute of one sweep run with ``--jobs N`` for several N, as ratios to N = 1.

Each N runs the whole sweep (``python -m fedimb.cli sweep ... -q --jobs N``) in a fresh
subprocess into a fresh folder, so every N pays its own start-up, validation and report.
Reported per N: wall seconds, cells per minute, the ratio to N = 1 of the same run, images
trained per second (the cells' training images x local epochs x rounds, over the wall
time), the load average before and after (the ratio means little on a busy machine), and
whether every cell's final balanced error equals N = 1's (the promise of ``--jobs``).

Examples
--------
CPU, the digits comparison (72 cells) with fewer rounds::

    python benchmarks/bench_sweep_jobs.py --jobs 1,2 --set num-rounds=5 \\
        --out benchmarks/results/cpu-sweep-jobs.json

GPU, 8 CIFAR-10 CNN cells of 100 clients and 5 rounds on one card::

    python benchmarks/bench_sweep_jobs.py --sweep benchmarks/sweep_jobs_gpu.toml \\
        --jobs 1,2,4 --set data-root=../shared/data/cifar10-jpeg \\
        --out benchmarks/results/gpu-sweep-jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``uptime``)."""
    return [round(x, 2) for x in os.getloadavg()]


def images_trained(out: Path) -> int:
    """Training images over every cell of a sweep folder: counts x local epochs x rounds."""
    total = 0
    for cell in json.loads((out / "sweep.json").read_text())["cells"]:
        folder = out / cell["name"]
        counts = json.loads((folder / "partition.json").read_text())["counts"]
        config = tomllib.loads((folder / "config.toml").read_text())
        rounds = json.loads((folder / "summary.json").read_text()).get("rounds_completed", 0)
        total += sum(map(sum, counts)) * config.get("local-epochs", 1) * rounds
    return total


def final_errors(out: Path) -> dict[str, float | None]:
    """Cell name -> its final balanced error."""
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    return {
        c["name"]: json.loads((out / c["name"] / "summary.json").read_text()).get(
            "final_balanced_error"
        )
        for c in cells
    }


def run_sweep(sweep: Path, jobs: int, overrides: list[str], out: Path) -> dict[str, Any]:
    """One whole sweep with ``--jobs jobs``; its wall time and what it trained."""
    command = [sys.executable, "-m", "fedimb.cli", "sweep", str(sweep), "--out", str(out)]
    command += ["-q", "--jobs", str(jobs)]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    before = load_average()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"--jobs {jobs} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cells = len(json.loads((out / "sweep.json").read_text())["cells"])
    return {
        "jobs": jobs,
        "wall_s": round(wall, 2),
        "cells": cells,
        "cells_per_min": round(cells / wall * 60, 2),
        "img_per_s": round(images_trained(out) / wall, 1),
        "load_before": before,
        "load_after": load_average(),
    }


def _shown(path: Path) -> Path:
    """``path`` relative to the repository where it lies inside (results are committed)."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=ROOT / "configs" / "compare.toml")
    parser.add_argument("--jobs", default="1,2", help="comma-separated N to run (first: base)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    jobs = [int(j) for j in args.jobs.split(",")]
    result: dict[str, Any] = {
        "sweep": str(_shown(args.sweep)),
        "overrides": args.overrides,
        "cores": len(os.sched_getaffinity(0)),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-sweep-jobs-") as tmp:
        base_errors = None
        for n in jobs:
            out = Path(tmp) / f"jobs-{n}"
            run = run_sweep(args.sweep, n, args.overrides, out)
            errors = final_errors(out)
            base_errors = errors if base_errors is None else base_errors
            run["same_final_errors_as_first"] = errors == base_errors
            run["ratio_to_first"] = round(
                run["cells_per_min"] / result["runs"][0]["cells_per_min"]
                if result["runs"]
                else 1.0,
                3,
            )
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
