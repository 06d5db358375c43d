"""The command line: sweeps end to end, partitions, listings, and advice on resource errors."""

import errno
import os
from pathlib import Path

import pytest
import torch

from fedimb import cli
from fedimb.cli import main, resource_hint
from fedimb.results import read_json, read_jsonl


def files(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` with its bytes: what a refused command must not touch."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_sweep_runs_cells_records_a_broken_one_and_resumes(tmp_path, capsys):
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(
        f'base = "{(cli.DEFAULT_CONFIG).as_posix()}"\n'
        'name = "tiny"\n'
        "[set]\n"
        'engine = "inprocess"\n'
        "num-rounds = 2\n"
        "num-clients = 6\n"
        "[grid]\n"
        '"loss.name" = ["ce", "focal"]\n'
        # every client of the second value fails: that cell must fail alone
        '"faults.raise-clients" = ["", "0,1,2,3,4,5"]\n'
    )
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "-q"]) == 1  # one failed cell
    printed = capsys.readouterr().out
    assert "2 cells completed, 2 failed" in printed
    cells = read_json(out / "sweep.json")["cells"]
    status = {c["name"]: c["status"] for c in cells}
    assert sorted(status.values()) == ["completed", "completed", "failed", "failed"]
    failed = next(c for c in cells if c["status"] == "failed")
    assert "TooManyFailures" in read_json(out / failed["name"] / "summary.json")["error"]
    for name in ("report.md", "report.csv", "curves.png", "per_class.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "report.md").read_text().startswith("# Report: tiny\n")  # the sweep's name

    # Re-running skips the completed cells and retries the failed ones only.
    assert main(["sweep", str(sweep), "--out", str(out), "-q"]) == 1
    assert "2 cells completed, 2 failed" in capsys.readouterr().out

    # A changed sweep would mix old and new results in one report: refused, nothing lost.
    before = files(out)
    sweep.write_text(
        sweep.read_text().replace('engine = "inprocess"', 'engine = "inprocess"\nlr = 0.1')
    )
    assert main(["sweep", str(sweep), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "4 of 4 sweep cell(s)" in err and "lr 0.05 -> 0.1" in err
    assert files(out) == before


def rounds_sweep(folder: Path, rounds: int, settings: str, grid: str) -> Path:
    """A sweep file of in-process runs of ``rounds`` rounds (one file per count)."""
    path = folder / f"sweep-{rounds}.toml"
    path.write_text(
        f'base = "{cli.DEFAULT_CONFIG.as_posix()}"\nname = "rounds"\n[set]\n'
        f'engine = "inprocess"\nnum-rounds = {rounds}\n{settings}\n[grid]\n{grid}\n'
    )
    return path


@pytest.mark.slow
def test_a_sweep_given_more_rounds_runs_its_cells_on(tmp_path, capsys, caplog):
    def sweep_file(rounds: int) -> Path:
        grid = '"loss.name" = ["ce", "ldam-drw"]'
        return rounds_sweep(tmp_path, rounds, "num-clients = 6", grid)

    def curves(out: Path) -> dict[str, list[float]]:
        return {
            d.name: [r["balanced_error"] for r in read_jsonl(d / "metrics.jsonl")]
            for d in sorted(out.iterdir())
            if d.is_dir()
        }

    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(["sweep", str(sweep_file(2)), "--out", str(out), "-q"]) == 0
    first = {d.name: (d / "metrics.jsonl").read_text() for d in out.iterdir() if d.is_dir()}
    assert main(["sweep", str(sweep_file(3)), "--out", str(fresh), "-q"]) == 0
    with caplog.at_level("WARNING"):
        assert main(["sweep", str(sweep_file(3)), "--out", str(out), "-q"]) == 0
    assert "2 cells completed, 0 failed" in capsys.readouterr().out
    grown, uninterrupted = curves(out), curves(fresh)
    assert [len(c) for c in grown.values()] == [4, 4]  # rounds 0-3
    ce = next(name for name in grown if "ce" in name and "ldam" not in name)
    assert grown[ce] == pytest.approx(uninterrupted[ce], abs=1e-9)
    assert read_json(out / ce / "summary.json")["rounds_completed"] == 3
    for name, rows in first.items():  # rounds 0-2 kept as they were (elapsed_s too): not rerun
        assert (out / name / "metrics.jsonl").read_text().startswith(rows)
    # LDAM-DRW's switch is a fraction of num-rounds: said once, naming its cell.
    moved = [r.getMessage() for r in caplog.records if "drw-start" in r.getMessage()]
    assert len(moved) == 1 and moved[0].startswith("loss.name=ldam-drw")
    assert "num-rounds 2 -> 3" in moved[0]

    # Fewer rounds than the cells have run: refused, every file kept.
    before = files(out)
    assert main(["sweep", str(sweep_file(2)), "--out", str(out), "-q"]) == 2
    assert "has reached round 3; give at least that many" in capsys.readouterr().err
    assert files(out) == before


@pytest.mark.slow
def test_a_sweep_without_checkpoints_runs_a_cell_again_for_more_rounds(tmp_path, caplog, capsys):
    def sweep_file(rounds: int) -> Path:
        return rounds_sweep(tmp_path, rounds, "num-clients = 4\ncheckpoint-every = 0", "seed = [0]")

    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file(3)), "--out", str(out), "-q"]) == 0
    assert not list(out.rglob("checkpoint.pt"))
    before = files(out)
    assert main(["sweep", str(sweep_file(2)), "--out", str(out), "-q"]) == 2  # not "done"
    assert "has reached round 3" in capsys.readouterr().err
    assert files(out) == before
    with caplog.at_level("WARNING"):
        assert main(["sweep", str(sweep_file(4)), "--out", str(out), "-q"]) == 0
    assert "num-rounds 3 -> 4: no checkpoint to continue from: it runs again" in caplog.text
    rows = read_jsonl(out / "seed=0" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]


def test_a_sweeps_cells_take_set_from_the_command_line(tmp_path, capsys):
    sweep = rounds_sweep(tmp_path, 3, 'loss.name = "ce"', "seed = [0]")
    out = tmp_path / "out"
    shorter = ["--set", "num-rounds=1", "--set", "num-clients=4"]
    assert main(["sweep", str(sweep), "--out", str(out), "-q", *shorter]) == 0
    assert cli.load_config(out / "seed=0" / "config.toml")["num-rounds"] == 1
    assert read_json(out / "sweep.json")["sweep"]["set"]["num-clients"] == 4
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "o2"), "--set", "seed=3"]) == 2
    assert f"--set seed: swept in the [grid] of {sweep}" in capsys.readouterr().err


def test_bad_sweep_cell_fails_before_anything_runs(tmp_path, capsys):
    sweep = tmp_path / "bad.toml"
    sweep.write_text(
        f'base = "{(cli.DEFAULT_CONFIG).as_posix()}"\n'
        "[grid]\n"
        '"partition.classes-per-client" = [2, 11]\n'
    )
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert "classes-per-client" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_sweep_says_each_cells_partition_warning_once_and_names_the_cell(tmp_path, caplog):
    # A long tail leaves some #C=2 clients with one class; the sweep checks every cell
    # before running any, and the runs must not repeat what the check said.
    sweep = tmp_path / "tail.toml"
    sweep.write_text(
        f'base = "{(cli.DEFAULT_CONFIG).as_posix()}"\n'
        "[set]\n"
        'engine = "inprocess"\n'
        "num-rounds = 1\n"
        "num-clients = 30\n"
        '"long-tail.ratio" = 50\n'
        "[grid]\n"
        "seed = [0, 1]\n"
        '"loss.name" = ["ce", "focal"]\n'
    )
    with caplog.at_level("WARNING", logger="fedimb.preflight"):
        assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "-q"]) == 0
    said = [r.getMessage() for r in caplog.records if "fewer than 2 classes" in r.getMessage()]
    assert len(said) == 2, said  # one per partition (seed), not per cell and phase
    assert [m.split(",")[0] for m in said] == ["seed=0", "seed=1"]
    assert len(set(m.split(": ", 1)[1] for m in said)) == 2  # the seeds' splits differ


def test_a_grid_key_that_no_cell_takes_is_refused_before_anything_runs(tmp_path, capsys):
    # Dirichlet's alpha on label-skew cells: every value would run the same split.
    sweep = tmp_path / "alpha.toml"
    sweep.write_text(
        f'base = "{(cli.DEFAULT_CONFIG).as_posix()}"\n[grid]\n"partition.alpha" = [0.1, 1.0]\n'
    )
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert "no cell's component takes grid key(s) partition.alpha" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # Taken by some cells (focal's gamma, beside ce): a sweep the user may mean.
    from fedimb.sweep import load_sweep
    from fedimb.sweep.command import grid_keys_no_cell_takes

    sweep.write_text(
        f'base = "{(cli.DEFAULT_CONFIG).as_posix()}"\n[grid]\n'
        '"loss.name" = ["ce", "focal"]\n"loss.gamma" = [1.0, 2.0]\n'
        '"partition.name" = ["label-skew", "dirichlet"]\n"partition.alpha" = [0.1, 1.0]\n'
    )
    assert grid_keys_no_cell_takes(load_sweep(sweep)) == []


def test_partitions_prints_counts_and_writes_a_heatmap(tmp_path, capsys, caplog):
    png = tmp_path / "p.png"
    assert main(["partitions", "--set", "partition.classes-per-client=1", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "classes per client: min 1" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["partitions", "--png", str(tmp_path)]) == 2  # a folder is there
    assert "cannot write the heatmap there" in capsys.readouterr().err
    # Dirichlet's alpha on the default label-skew split changes nothing: said.
    with caplog.at_level("WARNING", logger="fedimb.preflight"):
        assert main(["partitions", "--set", "partition.alpha=0.1", "--png", str(png)]) == 0
    assert "partition.alpha is ignored: partition 'label-skew' does not take it" in caplog.text


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("digits", "label-skew", "ldam-drw", "drs", "resnet32", "scaffold"):
        assert word in out
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "  imagefolder: Images in data-root/train/<class>/* and data-root/test/" in out


@pytest.mark.parametrize(
    ("exc", "advice"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "group-size"),
        (OSError(errno.ENOSPC, "No space left on device"), "free disk space"),
        (RuntimeError("Failed to start Ray: raylet died"), "--engine inprocess"),
    ],
)
def test_resource_errors_end_with_one_line_of_advice(monkeypatch, capsys, tmp_path, exc, advice):
    assert advice in resource_hint(exc)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr("fedimb.sim.run_experiment", fail)
    assert main(["run", "--engine", "inprocess", "--out", str(tmp_path / "r")]) == 1
    assert advice in capsys.readouterr().err


def test_other_errors_are_not_disguised():
    assert resource_hint(ValueError("a bug")) is None


def test_sigterm_stops_a_command_as_ctrl_c_does(monkeypatch, capsys):
    import os
    import signal

    previous = signal.getsignal(signal.SIGTERM)

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or `timeout` would

    monkeypatch.setitem(cli.COMMANDS, "list", terminated)
    assert main(["list"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous  # restored for the caller


def test_main_runs_outside_the_main_thread(capsys):
    import threading

    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(["list"])))
    worker.start()
    worker.join()
    assert codes == [0] and "losses:" in capsys.readouterr().out


def test_list_of_a_table_shows_each_ones_parameters_as_config_keys(capsys):
    assert main(["list", "losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  (all): s = (unset)"  # shared by every loss: listed once
    assert (
        '  ldam-drw: max-m = 0.5, missing = "present", min-count = 1, drw-start = 0.8, '
        "drw-beta = 0.9999" in lines
    )
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    assert "  fedprox: proximal-mu = 0.0\n" in out and "  fedavg: (all) only\n" in out
    assert "  qfedavg: client-learning-rate = (required)" in out
    assert main(["list", "partitions"]) == 0
    assert (
        "  dirichlet: alpha = 0.5, min-size = 10, max-tries = 1000, balance = true\n"
        in capsys.readouterr().out
    )


def test_resume_into_another_out_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cli.load_config().to_toml())
    assert main(["run", "--resume", str(run), "--out", str(tmp_path / "elsewhere")]) == 2
    assert f"continues in {run} itself; drop --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_stopped_in_its_first_round_may_be_given_other_rounds(tmp_path, capsys):
    # Interrupted before any checkpoint: nothing to continue, so nothing is lost by
    # starting it over with another num-rounds.
    from fedimb.results import DEFAULTS_VERSION

    run = tmp_path / "early"
    run.mkdir()
    config = cli.load_config(None, {"engine": "inprocess", "num-clients": 4, "num-rounds": 5})
    (run / "config.toml").write_text(config.to_toml())
    (run / "summary.json").write_text(
        f'{{"status": "interrupted", "rounds_completed": 0, "defaults": {DEFAULTS_VERSION}}}'
    )
    assert main(["run", "--resume", str(run), "--set", "num-rounds=2", "-q"]) == 0
    assert read_json(run / "summary.json")["rounds_completed"] == 2


def test_a_run_begun_under_other_defaults_is_not_continued(tmp_path, capsys):
    # A results folder of a fedimb before DEFAULTS_VERSION 2: its summary has no "defaults".
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.toml").write_text(cli.load_config().to_toml())
    (run / "summary.json").write_text('{"status": "interrupted", "rounds_completed": 3}')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["run", "--resume", str(run)]) == 2
    from fedimb.results import DEFAULTS_VERSION

    said = f"began under fedimb's defaults 1, this version has {DEFAULTS_VERSION}"
    assert said in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_report_and_out_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err
    (tmp_path / "afile").write_text("mine")
    assert main(["run", "--out", str(tmp_path / "afile"), "--set", "num-rounds=1"]) == 2
    assert "a file is there" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_signal_after_a_ray_runs_last_round_stops_a_sweep_before_its_next_cell(
    tmp_path, monkeypatch
):
    from fedimb.engines import ray as sim

    interruption = sim.RayInterruption()
    interruption.signalled = True
    interruption.raise_if_stopped({"status": "completed"})  # the run itself stays completed
    assert sim.late_interrupt() and not sim.late_interrupt()  # said once
    with pytest.raises(KeyboardInterrupt):
        interruption.raise_if_stopped({"status": "running"})

    calls = iter([False, True])  # the sweep first forgets an old one, then asks per cell
    monkeypatch.setattr(sim, "late_interrupt", lambda: next(calls, False))
    sweep = rounds_sweep(tmp_path, 1, 'loss.name = "ce"', "seed = [0, 1]")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "-q", "--set", "num-clients=4"]) == 130
    assert read_json(out / "seed=0" / "summary.json")["status"] == "completed"
    assert not (out / "seed=1").exists()  # the next cell never started
    cells = read_json(out / "sweep.json")["cells"]
    assert [c["status"] for c in cells] == ["completed", "pending"]


def test_a_results_folder_has_one_writer(tmp_path, capsys):
    from fedimb.results import claimed

    run = ["run", "--engine", "inprocess", "--set", "num-rounds=1", "-q"]
    busy = tmp_path / "busy"
    busy.mkdir()
    with claimed(busy):  # as another fedimb process holds it
        assert main([*run, "--out", str(busy)]) == 2
        assert "being written by another fedimb process" in capsys.readouterr().err
        sweep = rounds_sweep(tmp_path, 1, 'loss.name = "ce"', "seed = [0]")
        assert main(["sweep", str(sweep), "--out", str(busy), "-q"]) == 2
    assert list(busy.iterdir()) == []  # neither wrote anything
    assert main([*run, "--out", str(busy)]) == 0  # free again

    # Runs started in the same second get a folder each (no --out: results/<time>-...).
    from fedimb.config import load_config
    from fedimb.results import new_run_dir

    config = load_config()
    first, second = new_run_dir(config, tmp_path / "r"), new_run_dir(config, tmp_path / "r")
    assert first != second and first.is_dir() and second.is_dir()


def test_a_new_run_neither_overwrites_other_files_nor_leaves_an_empty_folder(tmp_path, capsys):
    run = ["run", "--engine", "inprocess", "--set", "num-rounds=1", "-q", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# my notes\nnum-rounds = 2\n")
    assert main([*run, str(mine)]) == 2
    assert "holds files that are not a fedimb run's (config.toml)" in capsys.readouterr().err
    assert (mine / "config.toml").read_text().startswith("# my notes")
    (mine / "config.toml").unlink()
    (mine / "notes.txt").write_text("x")
    assert main([*run, str(mine)]) == 2 and "(notes.txt)" in capsys.readouterr().err

    # An earlier attempt's own files (it died before its summary): the run starts over.
    (mine / "notes.txt").unlink()
    assert main([*run, str(mine), "--set", "num-clients=5000"]) == 2  # fails on its data
    assert main([*run, str(mine), "--set", "num-rounds=2"]) == 0  # (its first attempt's)
    (mine / "summary.json").unlink()
    assert main([*run, str(mine)]) == 0
    assert read_json(mine / "summary.json")["num_rounds"] == 1

    # A run that fails on its data, before writing, leaves no folder behind.
    new = tmp_path / "new" / "run"
    assert main([*run, str(new), "--set", "num-clients=5000"]) == 2
    assert not new.exists()
    (tmp_path / "afile").write_text("")
    assert main([*run, str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot create the results folder" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # Flower's FedAvgM
def test_a_strategy_that_makes_a_non_finite_model_fails_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--engine", "inprocess", "--set", "num-rounds=2", "-q", "--out", str(out)]
    huge = ["--set", "strategy.name=fedavgm", "--set", "strategy.server-learning-rate=1e39"]
    assert main([*args, *huge]) == cli.EXIT_FAILED
    assert "round 1: strategy 'fedavgm' made a global model with non-finite weights" in (
        capsys.readouterr().err
    )
    summary = read_json(out / "summary.json")
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0


def test_damaged_results_files_are_named_in_one_line(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    run = ["run", "--engine", "inprocess", "--set", "num-rounds=2", "-q", "--out", str(out)]
    assert main(run) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes
    more = ["run", "--resume", str(out), "--set", "num-rounds=3", "-q"]
    checkpoint = (out / "checkpoint.pt").read_bytes()
    for damaged in (checkpoint[:1000], b""):
        (out / "checkpoint.pt").write_bytes(damaged)
        assert main(more) == 2
        err = capsys.readouterr().err
        assert f"{out / 'checkpoint.pt'} is damaged (" in err and "delete it" in err
        assert "Traceback" not in err
    (out / "checkpoint.pt").write_bytes(checkpoint)
    summary = (out / "summary.json").read_text()
    (out / "summary.json").unlink()
    assert main(more) == 2
    assert "has a checkpoint but no summary.json" in capsys.readouterr().err
    (out / "summary.json").write_text(summary[:20])
    assert main(more) == 2
    assert f"{out / 'summary.json'} is damaged (" in capsys.readouterr().err

    # A report of many runs goes on without a damaged file, and says so.
    (out / "summary.json").write_text(summary)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0][:9], *lines[1:]]) + "\n")
    assert main(["report", str(out)]) == 0
    assert "metrics.jsonl is damaged at line 1" in caplog.text


def test_a_folder_that_cannot_be_locked_still_runs_and_says_so(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_flock(fd, operation):  # NFS: no exclusive flock on a folder opened read-only
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "nfs"
    assert (
        main(["run", "--engine", "inprocess", "--set", "num-rounds=1", "-q", "--out", str(out)])
        == 0
    )
    assert f"cannot lock {out} ([Errno 9] Bad file descriptor)" in caplog.text
