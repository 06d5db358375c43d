"""A new user's first contact: quiet logs without a terminal, the hint after a small Ray
run, the configs found from an installed wheel, Flower-side config errors, dependencies."""

import os
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedimb import cli
from fedimb.cli import main
from fedimb.config import (
    COMPONENT_DEFAULTS,
    COMPONENT_OWN_KEYS,
    DEFAULT_CONFIG,
    FIXED_TABLES,
    TOP_LEVEL,
    ConfigError,
    flatten,
    load_config,
)
from fedimb.engines import ray as ray_engine
from fedimb.progress import RunProgress, SweepProgress
from fedimb.serverapp import checked_config

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_inside_a_sweep_prints_nothing_without_a_terminal(capsys):
    with SweepProgress(2, "demo") as sweep:
        for cell in range(1, 3):
            with RunProgress(5, f"cell{cell}") as run:
                for r in range(6):
                    run.update(r, 0.5)
            sweep.update(cell, f"cell{cell}", "completed", 0.5, 1.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "demo [1/2] cell1: completed final_balanced_error=0.5000 (1.0 s)",
        "demo [2/2] cell2: completed final_balanced_error=0.5000 (1.0 s)",
    ]
    # Alone (after the sweep), a run prints one line per round again.
    with RunProgress(2, "alone") as run:
        run.update(1, 0.5)
        run.update(2, 0.25)
    assert capsys.readouterr().out.splitlines() == [
        "alone round 1/2 balanced_error=0.5000",
        "alone round 2/2 balanced_error=0.2500",
    ]


@pytest.mark.slow
def test_a_sweep_without_a_terminal_prints_one_line_per_cell(tmp_path, capsys):
    sweep = tmp_path / "two.toml"
    sweep.write_text(
        f'base = "{cli.DEFAULT_CONFIG.as_posix()}"\nname = "two"\n[set]\n'
        'engine = "inprocess"\nnum-rounds = 3\nnum-clients = 4\n'
        '[grid]\n"loss.name" = ["ce", "focal"]\n'
    )
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out")]) == 0  # no -q
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines  # two cells, then the sweep's summary
    assert all(line.startswith("two [") for line in lines[:2])
    assert lines[2].startswith("sweep: 2 cells completed, 0 failed")


def test_a_short_or_start_bound_ray_run_hints_at_the_inprocess_engine_once(monkeypatch, caplog):
    monkeypatch.setattr(ray_engine, "_HINTED", threading.Event())
    long_rounds = ray_engine.SHORT_RUN_S * 3
    assert not ray_engine.hint_inprocess(long_rounds, long_rounds - 10)  # rounds dominate
    assert not caplog.records
    assert ray_engine.hint_inprocess(40.0, 7.0)  # short, mostly Ray's start
    assert "--engine inprocess" in caplog.text and "40.0 s, 33.0 s of it" in caplog.text
    assert not ray_engine.hint_inprocess(40.0, 7.0)  # once per process (a sweep's cells)
    assert len(caplog.records) == 1


def flwr_run_config() -> dict[str, object]:
    """The run config `flwr run .` starts from: pyproject's [tool.flwr.app.config]."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten(pyproject["tool"]["flwr"]["app"]["config"])


def fixed_keys() -> dict[str, object]:
    """Every config key that is not a component's own parameter, with its default."""
    keys = {k: f.default for k, f in TOP_LEVEL.items()}
    for table, fields in {**FIXED_TABLES, **COMPONENT_OWN_KEYS}.items():
        keys.update({f"{table}.{k}": f.default for k, f in fields.items()})
    keys.update({f"{table}.name": name for table, name in COMPONENT_DEFAULTS.items()})
    return keys


def test_flwr_run_accepts_every_fedimb_key(tmp_path):
    # Flower refuses an undeclared --run-config key without naming it; declared, a bad
    # value reaches fedimb's check, which names it.
    app = flwr_run_config()
    quickstart = load_config(DEFAULT_CONFIG).to_flat()
    missing = sorted(set(fixed_keys()) - set(app))
    assert not missing, f"declare these in [tool.flwr.app.config]: {missing}"
    for key in fixed_keys():
        assert app[key] == quickstart[key], key  # the quickstart's run, at the defaults


def test_a_bad_flwr_run_config_fails_in_one_line_naming_the_key(caplog):
    run_config = flwr_run_config()
    assert checked_config(run_config) == load_config(DEFAULT_CONFIG)
    with pytest.raises(ConfigError, match=r"\[tool.flwr.app.config\].*: lr = -1.0: must be"):
        checked_config({**run_config, "lr": -1.0})
    assert "fedimb: error: bad run config" in caplog.text
    # Checked on the data too, as `fedimb run` does before anything starts.
    with pytest.raises(ConfigError, match=r"classes-per-client must be between 1 and .* 11"):
        checked_config({**run_config, "partition.classes-per-client": 11})


# What a wheel is built from (setup.py's packages, pyproject's readme).
PACKAGED = ("fedimb", "strategies", "clients", "configs", "pyproject.toml", "setup.py", "README.md")


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs(tmp_path):
    # `pip install .` (not editable) puts fedimb in site-packages, away from configs/.
    # Built from a copy: pip builds in the source tree (build/, *.egg-info).
    source = tmp_path / "source"
    for name in PACKAGED:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("fedimb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")  # what pip installs, without its records
    shipped = {f"fedimb/configs/{p.name}" for p in (ROOT / "configs").glob("*.toml")}
    assert shipped and shipped <= names
    found = subprocess.run(
        [sys.executable, "-c", "from fedimb.config import DEFAULT_CONFIG, load_config; "
         "print(DEFAULT_CONFIG); load_config(DEFAULT_CONFIG)"],
        capture_output=True, text=True, cwd=tmp_path,  # no checkout on the path
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    assert (
        Path(found.stdout.strip()) == tmp_path / "site" / "fedimb" / "configs" / "quickstart.toml"
    )
