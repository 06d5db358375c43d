"""Bad input that once slipped through: each now ends in one line that says what to do."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fedimb.cli import EXIT_BAD_INPUT, EXIT_FAILED, main
from fedimb.results import read_json

FAST = ["--engine", "inprocess", "--set", "num-clients=4", "-q"]


def write_module(folder, name: str, code: str, monkeypatch) -> None:
    """A plug-in module ``name`` importable for this test only."""
    (folder / f"{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(folder))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedimb: error: "), err
    return err


def test_a_strategy_that_raises_in_its_init_is_a_config_error(tmp_path, capsys, monkeypatch):
    write_module(
        tmp_path,
        "boom_strategy",
        """
        from flwr.serverapp.strategy import FedAvg

        class Boom(FedAvg):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                raise RuntimeError("no budget left")
        """,
        monkeypatch,
    )
    out = tmp_path / "run"
    args = ["run", *FAST, "--set", "strategy.name=boom_strategy:Boom", "--out", str(out)]
    assert main(args) == EXIT_BAD_INPUT
    err = one_line_error(capsys)
    assert "[strategy] boom_strategy:Boom: RuntimeError: no budget left" in err
    assert not out.exists()


def test_a_dataset_with_one_class_says_so(tmp_path, capsys, monkeypatch):
    write_module(
        tmp_path,
        "one_class_data",
        """
        import torch
        from fedimb.data.datasets import Dataset

        def load(root, cache_dir):
            x, y = torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64)
            return Dataset("one", x, y, x, y, ["cat"], (0.0,) * 3, (1.0,) * 3, 1.0)
        """,
        monkeypatch,
    )
    args = ["run", *FAST, "--set", "dataset=one_class_data:load", "--out", str(tmp_path / "r")]
    assert main(args) == EXIT_BAD_INPUT
    err = one_line_error(capsys)
    assert "has 1 class(es) (cat): at least two are needed" in err


def test_a_sweep_file_or_a_folder_as_config_is_named_as_such(tmp_path, capsys):
    sweep = tmp_path / "grid.toml"
    sweep.write_text('base = "quickstart.toml"\n[grid]\nseed = [0, 1]\n')
    assert main(["run", "--config", str(sweep)]) == EXIT_BAD_INPUT
    err = one_line_error(capsys)
    assert "is a sweep file" in err and f"`fedimb sweep {sweep}`" in err
    assert main(["partitions", "--config", str(tmp_path)]) == EXIT_BAD_INPUT
    assert f"config file {tmp_path} is a folder" in one_line_error(capsys)


@pytest.mark.slow
def test_a_resume_of_a_hand_edited_config_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--set", "num-rounds=2", "--out", str(out)]) == 0
    config = out / "config.toml"
    config.write_text(config.read_text().replace('name = "ce"', 'name = "focal"'))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--set", "num-rounds=3", "-q"]) == EXIT_BAD_INPUT
    err = one_line_error(capsys)
    assert "differs from the config its checkpoint was trained under" in err
    assert "loss.name 'ce' -> 'focal'" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Undone, it continues.
    config.write_text(config.read_text().replace('name = "focal"', 'name = "ce"'))
    assert main(["run", "--resume", str(out), "--set", "num-rounds=3", "-q"]) == 0
    assert read_json(out / "summary.json")["rounds_completed"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            ["lr=1e6"],
            "round 1: every client's training diverged (non-finite, or a loss over 1e+06); "
            "likely cause: the clients' learning rate (lr = 1e+06 in this round) is too high",
        ),
        (
            ["strategy.name=fedavgm", "strategy.server-learning-rate=1e12"],
            "round 2: every client's training diverged (non-finite, or a loss over 1e+06); "
            "likely cause: the server's step (strategy.server-learning-rate = 1e+12)",
        ),
    ],
)
def test_a_round_in_which_every_client_diverges_stops_the_run(tmp_path, capsys, settings, said):
    out = tmp_path / "run"
    sets = [a for s in settings for a in ("--set", s)]
    args = ["run", *FAST, "--set", "num-rounds=4", *sets, "--out", str(out)]
    assert main(args) == EXIT_FAILED
    assert said in capsys.readouterr().err.splitlines()[-1]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "failed" and said in summary["error"]


@pytest.mark.slow
def test_a_round_in_which_every_client_fails_the_same_way_stops_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    faults = ["--set", "faults.raise-clients=0,1,2,3", "--set", "max-failure-fraction=1.0"]
    assert main(["run", *FAST, "--set", "num-rounds=3", *faults, "--out", str(out)]) == EXIT_FAILED
    said = "round 1: every client failed the same way; first: error: InjectedFault"
    assert said in capsys.readouterr().err
    assert read_json(out / "summary.json")["status"] == "failed"


KILLED_AT_ROUND_3 = """
import os, signal, sys
from fedimb.config import load_config
from fedimb.sim import run_experiment

def on_round(server_round, row):
    if server_round == 3:
        os.kill(os.getpid(), signal.SIGKILL)

config = load_config(None, {"engine": "inprocess", "num-clients": 4, "num-rounds": 6,
                            "checkpoint-every": 2})
run_experiment(config, sys.argv[1], progress=None, on_round=on_round)
"""


@pytest.mark.slow
def test_summary_after_a_sigkill_says_the_last_checkpointed_round(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AT_ROUND_3, str(out)],
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "running" and summary["rounds_completed"] == 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # Flower's FedAvgM
def test_a_non_finite_global_model_names_the_server_step_that_made_it(tmp_path, capsys):
    huge = ["--set", "strategy.name=fedavgm", "--set", "strategy.server-learning-rate=1e39"]
    out = ["--set", "num-rounds=2", "--out", str(tmp_path / "run")]
    assert main(["run", *FAST, *huge, *out]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "non-finite weights (NaN or inf) from finite replies" in err
    assert "check its parameters (strategy.server-learning-rate = 1e+39)" in err
