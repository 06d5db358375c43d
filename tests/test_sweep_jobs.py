"""Sweeps that run several cells at once: ``--jobs N`` (worker processes) and ``--ray``.

The promise: the same cells, the same per-cell metrics and the same report as a sweep
run one cell after another; a failed cell recorded while the others go on; resumable;
Ctrl-C stops cleanly with completed cells kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedimb import cli
from fedimb import progress as progress_mod
from fedimb.cli import main
from fedimb.config import ConfigError
from fedimb.progress import SweepProgress
from fedimb.results import read_json, read_jsonl
from fedimb.sweep import executors, processes, ray_cells
from fedimb.sweep.executors import CellJob
from fedimb.sweep.processes import ProcessCells
from fedimb.sweep.ray_cells import RayCells

ROOT = Path(__file__).resolve().parents[1]
# Per round, what depends on the machine's speed, not on the training.
TIMING = {"elapsed_s"}


def tiny_sweep(folder: Path, grid: str, rounds: int = 2, extra: str = "") -> Path:
    path = folder / "tiny.toml"
    path.write_text(
        f'base = "{cli.DEFAULT_CONFIG.as_posix()}"\n'
        'name = "tiny"\n'
        "[set]\n"
        'engine = "inprocess"\n'
        f"num-rounds = {rounds}\n"
        "num-clients = 4\n"
        f"{extra}"
        "[grid]\n"
        f"{grid}"
    )
    return path


LOSS_SEED_GRID = '"loss.name" = ["ce", "focal"]\nseed = [0, 1]\n'


def cell_metrics(out: Path) -> dict[str, Any]:
    """Cell name -> (status, its rounds' metrics without timings)."""
    cells = read_json(out / "sweep.json")["cells"]
    found = {}
    for cell in cells:
        rows = [
            {k: v for k, v in row.items() if k not in TIMING}
            for row in read_jsonl(out / cell["name"] / "metrics.jsonl")
        ]
        found[cell["name"]] = (cell["status"], rows)
    return found


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tiny sweep run one cell after another: the reference."""
    folder = tmp_path_factory.mktemp("sequential")
    sweep = tiny_sweep(folder, LOSS_SEED_GRID)
    assert main(["sweep", str(sweep), "--out", str(folder / "out"), "-q"]) == 0
    return sweep, cell_metrics(folder / "out")


@pytest.mark.slow
def test_jobs_2_gives_the_sequential_metrics_and_resumes(tmp_path, sequential, capsys):
    sweep, expected = sequential
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "-q", "--jobs", "2"]) == 0
    assert cell_metrics(out) == expected
    assert all(status == "completed" for status, _ in expected.values())
    assert (out / "report.md").read_text().startswith("# Report: tiny\n")
    # Not on a terminal: one line per finished cell, no round lines from the workers.
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("tiny [") for line in printed) == 4
    assert not any("round" in line for line in printed)

    # Nothing runs again; one line per cell, in finishing order, says so.
    assert main(["sweep", str(sweep), "--out", str(out), "-q", "--jobs", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny [")]
    assert len(lines) == 4 and all("skipped (done)" in line for line in lines)


@pytest.mark.slow
def test_ray_with_2_workers_gives_the_sequential_metrics(tmp_path, sequential):
    pytest.importorskip("ray")
    import ray

    from fedimb.engines.ray import init_ray

    sweep, expected = sequential
    init_ray({"num_cpus": 2, "include_dashboard": False, "logging_level": "WARNING"})
    try:
        out = tmp_path / "out"
        assert main(["sweep", str(sweep), "--out", str(out), "-q", "--ray"]) == 0
        assert cell_metrics(out) == expected
        # The files came back from the tasks' own folders.
        assert (out / "loss.name=ce,seed=0" / "checkpoint.pt").is_file()
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_failed_cell_is_recorded_while_the_others_complete(tmp_path, capsys):
    # Every client of the second value raises: those cells fail, with the worker's traceback.
    grid = '"loss.name" = ["ce", "focal"]\n"faults.raise-clients" = ["", "0,1,2,3"]\n'
    sweep = tiny_sweep(tmp_path, grid)
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "-q", "--jobs", "2"]) == 1
    assert "2 cells completed, 2 failed" in capsys.readouterr().out
    status = {c["name"]: c["status"] for c in read_json(out / "sweep.json")["cells"]}
    failed = sorted(name for name, s in status.items() if s == "failed")
    assert failed == sorted(n for n in status if "0_1_2_3" in n or "0,1,2,3" in n)
    for name in failed:
        assert "TooManyFailures" in read_json(out / name / "summary.json")["error"]
        # The traceback names the worker's frames, not only the driver's.
        assert "run_cell_here" in (out / name / "traceback.txt").read_text()


@pytest.mark.slow
def test_ctrl_c_stops_running_cells_and_keeps_completed_ones(tmp_path):
    # Two short cells complete; the two long ones run together until SIGINT.
    sweep = tiny_sweep(tmp_path, "num-rounds = [2, 400]\nseed = [0, 1]\n", rounds=2)
    text = sweep.read_text().replace("num-rounds = 2\n", "")
    sweep.write_text(text)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fedimb.cli", "sweep", str(sweep), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*command, "-q", "--jobs", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    long_cells = [out / "num-rounds=400,seed=0", out / "num-rounds=400,seed=1"]
    deadline = time.monotonic() + 240
    while not all(len(read_jsonl_safe(c / "metrics.jsonl")) > 2 for c in long_cells):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert "continue with `fedimb sweep" in err.decode() and "--jobs 2" in err.decode()
    status = {c["name"]: c["status"] for c in read_json(out / "sweep.json")["cells"]}
    assert status == {
        "num-rounds=2,seed=0": "completed",
        "num-rounds=2,seed=1": "completed",
        "num-rounds=400,seed=0": "interrupted",
        "num-rounds=400,seed=1": "interrupted",
    }
    for cell in long_cells:  # each recorded its stop and kept a checkpoint to go on from
        assert read_json(cell / "summary.json")["status"] == "interrupted"
        assert (cell / "checkpoint.pt").is_file()


def read_jsonl_safe(path: Path) -> list[Any]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


# --------------------------------------------------------------------- quick checks


def test_threads_are_divided_among_jobs() -> None:
    assert executors.default_threads(2, cores=2) == 1
    assert executors.default_threads(4, cores=16) == 4
    assert executors.default_threads(8, cores=2) == 1


def test_cells_on_the_ray_engine_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"--jobs 2 runs each cell with the in-process.*"):
        executors.check_inprocess({"a": "inprocess", "b": "ray"}, "--jobs 2")
    executors.check_inprocess({"a": "inprocess"}, "--jobs 2")


@pytest.mark.parametrize("jobs", [0, -1])
def test_jobs_below_one_is_refused(jobs: int) -> None:
    with pytest.raises(ConfigError, match=r"--jobs .*>= 1"):
        ProcessCells(jobs, CellJob("x.toml", {}), lambda o: 1)


def test_ray_cells_that_fit_nowhere_are_refused() -> None:
    cells = RayCells("", CellJob("x.toml", {}), lambda o: 1, cell_cpus=1, cell_gpus=1)
    with pytest.raises(ConfigError, match=r"--cell-gpus 1: the Ray cluster has 0 GPU"):
        cells._check_fits({"CPU": 8})
    shared = RayCells("", CellJob("x.toml", {}), lambda o: 1, cell_cpus=1, cell_gpus=0.33)
    assert shared._check_fits({"CPU": 16, "GPU": 1}) == 3  # three cells share the GPU
    with pytest.raises(ConfigError, match=r"--cell-cpus -1"):
        RayCells("", CellJob("x.toml", {}), lambda o: 1, cell_cpus=-1)


def test_sweep_flags_that_do_not_go_together(tmp_path, capsys) -> None:
    sweep = tiny_sweep(tmp_path, LOSS_SEED_GRID)
    assert main(["sweep", str(sweep), "--cell-gpus", "0.5"]) == 2
    assert "--cell-cpus and --cell-gpus size Ray tasks: add --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not allowed with
        main(["sweep", str(sweep), "--jobs", "2", "--ray"])
    ray_cells = tiny_sweep(tmp_path, LOSS_SEED_GRID).read_text().replace("inprocess", "ray")
    (tmp_path / "ray.toml").write_text(ray_cells)
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "ray.toml"), "--out", str(out), "--jobs", "2"]) == 2
    assert "--set engine=inprocess" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_files_come_back_and_files_the_run_removed_go(tmp_path) -> None:
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "old.txt").write_text("sent, then removed by the run")
    (cell / "sub").mkdir()
    sent = ray_cells._read_folder(cell)
    ray_cells._write_folder(cell, {"summary.json": b"{}", "sub/a.bin": b"\x00"}, sent)
    assert ray_cells._read_folder(cell) == {"summary.json": b"{}", "sub/a.bin": b"\x00"}


def test_gpus_are_dealt_from_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert processes.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert processes.visible_gpus() == []


def test_a_running_cell_gets_a_line_under_the_sweep_bar_on_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(progress_mod, "stdout_is_terminal", lambda: True)
    monkeypatch.setattr(executors, "stdout_is_terminal", lambda: True)
    cells = ProcessCells(2, CellJob("x.toml", {}), lambda o: 5)
    with SweepProgress(4, "demo") as sweep_bar:
        with cells.cell_bar({}, Path("seed=0")) as line:
            line.update(2, 0.5)
            tasks = sweep_bar._progress.tasks
            assert [t.description for t in tasks] == ["demo", "seed=0"]
            assert tasks[1].total == 5 and tasks[1].completed == 2
        assert [t.description for t in sweep_bar._progress.tasks] == ["demo"]
    quiet = ProcessCells(2, CellJob("x.toml", {}), lambda o: 5, progress=False)
    assert quiet.cell_bar({}, Path("seed=0")).silent


def test_a_terminal_stays_a_terminal_under_the_live_bar(monkeypatch) -> None:
    # rich's live display swaps sys.stdout for a proxy whose isatty() is always False:
    # a cell's line opened under the sweep's bar must still see the terminal.
    import io

    from rich.console import Console
    from rich.file_proxy import FileProxy

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", FileProxy(Console(file=io.StringIO()), Terminal()))
    assert progress_mod.stdout_is_terminal()
    monkeypatch.setattr(sys, "stdout", FileProxy(Console(file=io.StringIO()), io.StringIO()))
    assert not progress_mod.stdout_is_terminal()
