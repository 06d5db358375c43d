"""A run killed with SIGKILL mid-run leaves valid files and resumes to the same result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedimb.results import read_jsonl

pytestmark = pytest.mark.slow

ARGS = [
    "--engine", "inprocess", "--set", "num-rounds=12", "--set", "num-clients=6",
    "--set", "strategy.name=fedavgm", "--set", "strategy.fraction-train=0.5",
    # a slow client (not a fault: no client-timeout) makes each round take ~0.3 s
    "--set", "faults.slow-clients=0,1,2,3,4,5", "--set", "faults.slow-s=0.05", "-q",
]  # fmt: skip


def fedimb(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedimb.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert fedimb("run", *ARGS, "--out", str(full)).wait(timeout=300) == 0

    proc = fedimb("run", *ARGS, "--out", str(cut))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        rows = read_jsonl(cut / "metrics.jsonl") if (cut / "metrics.jsonl").exists() else []
        if len(rows) >= 5:  # round 4 done: kill while later rounds are being written
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # Nothing half-written: every file parses; the summary says the run did not complete.
    rows = read_jsonl(cut / "metrics.jsonl")
    assert 5 <= len(rows) < 13
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "running"

    assert fedimb("run", "--resume", str(cut), "-q").wait(timeout=300) == 0
    strip = ("elapsed_s",)
    a = [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(cut / "metrics.jsonl")]
    b = [{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(full / "metrics.jsonl")]
    assert a == b
    assert json.loads((cut / "summary.json").read_text())["status"] == "completed"


def ray_actors_started(pgid: int) -> bool:
    found = subprocess.run(["pgrep", "-g", str(pgid), "-f", "ray::"], capture_output=True)
    return found.returncode == 0


@pytest.mark.parametrize(
    ("when", "signum"),
    [("running", signal.SIGINT), ("running", signal.SIGTERM), ("starting", signal.SIGINT)],
)
def test_ctrl_c_or_sigterm_ends_a_ray_run_and_says_so(tmp_path, when, signum):
    # Under Ray, Flower runs the server in a thread of its own, ray.init installs a SIGTERM
    # handler, and a KeyboardInterrupt raised into Ray mid-call crashed the process (-11).
    def as_a_terminal_does():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # not ignored, even if it is here

    out, err = tmp_path / "run", tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "fedimb.cli", "run", "--out", str(out),
             "-q", "--set", "num-rounds=500", "--set", "num-clients=4"],
            stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True, preexec_fn=as_a_terminal_does,
        )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if when == "starting" and ray_actors_started(proc.pid):
            break
        rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        if when == "running" and len(rows) >= 3:
            break
        assert proc.poll() is None, err.read_text()
        time.sleep(0.02)
    os.killpg(proc.pid, signum)  # Ctrl-C reaches the whole process group
    try:
        returncode = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)  # faulthandler prints every thread's stack
        proc.wait()
        pytest.fail(f"still running 120 s after the signal:\n{err.read_text()[-6000:]}")
    assert returncode == 130, err.read_text()[-3000:]
    if not (out / "config.toml").exists():  # stopped while Ray started: nothing to resume
        assert when == "starting"
        assert "stopped before its first round and wrote nothing: run it again" in err.read_text()
        return
    assert "interrupted; continue with `fedimb run --resume" in err.read_text()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    if when == "running":
        summary = json.loads((out / "summary.json").read_text())
        assert 2 <= summary["rounds_completed"] == len(read_jsonl(out / "metrics.jsonl")) - 1
