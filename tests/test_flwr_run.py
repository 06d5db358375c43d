"""The project is a Flower App: `flwr run . --run-config <config>` runs our ServerApp/ClientApp."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedimb.config import dump_toml, read_toml
from fedimb.results import read_json, read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _superlinks() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to stop the SuperLink")
def test_flwr_run_with_a_fedimb_config(tmp_path):
    config = read_toml(ROOT / "configs" / "quickstart.toml")
    config.update({"num-rounds": 2, "num-clients": 10, "out-dir": str(tmp_path / "run")})
    (tmp_path / "run.toml").write_text(dump_toml(config))
    flwr = Path(sys.executable).with_name("flwr")
    env = {
        **os.environ,
        # Our own Flower home and ports, and no dependency install (offline): see
        # ../shared/FLOWER_NOTES.md.
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # `flwr run` starts `flower-superlink` by name: find it beside `flwr` even when
        # the virtual environment is not activated.
        "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    before = _superlinks()
    try:
        proc = subprocess.run(
            [str(flwr), "run", str(ROOT), "--run-config", str(tmp_path / "run.toml"),
             "--federation-config", "num-supernodes=10", "--stream"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        for pid in _superlinks() - before:  # flwr run leaves its SuperLink running
            os.kill(pid, signal.SIGTERM)
    # `flwr run --stream` exits 0 even when the run fails: check the results instead.
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["status"] == "completed"
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["balanced_error"] < rows[0]["balanced_error"]
