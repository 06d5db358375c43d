"""Results files are never half-written: atomic replaces, append-only logs that survive a cut."""

import json
import os

import pytest

from fedimb.results import (
    DamagedFile,
    RunRecorder,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
)


def test_a_crash_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"status": "running"})

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, '{"status": "compl')
    assert read_json(path) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_non_finite_numbers_become_null_not_invalid_json(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None]}


def test_a_line_cut_by_a_crash_is_skipped_only_at_the_end(tmp_path):
    path = tmp_path / "clients.jsonl"
    append_jsonl(path, [{"round": 1}, {"round": 2}])
    with open(path, "a") as f:
        f.write('{"round": 3, "loss"')  # a kill in the middle of an append
    assert read_jsonl(path) == [{"round": 1}, {"round": 2}]
    path.write_text('{"round": 1\n{"round": 2}\n')
    with pytest.raises(DamagedFile, match=r"clients.jsonl is damaged at line 1 \("):
        read_jsonl(path)
    (tmp_path / "summary.json").write_text('{"status": "interr')
    with pytest.raises(DamagedFile, match=r"summary.json is damaged \("):
        read_json(tmp_path / "summary.json")


def test_resume_drops_what_came_after_the_checkpoint(tmp_path):
    rec = RunRecorder(tmp_path, seed=0, num_rounds=5)
    for r in range(4):
        rec.add_round({"round": r, "balanced_error": 0.5 - r / 10, "accuracy": 0.5})
        rec.add_clients([{"round": r, "node": 1}, {"round": r, "node": 2}])
    rec.summary("running", 3.0)
    again = RunRecorder(tmp_path, seed=0, num_rounds=5)
    again.resume_from(2)
    assert [r["round"] for r in read_jsonl(tmp_path / "clients.jsonl")] == [0, 0, 1, 1, 2, 2]
    summary = again.summary("completed", 1.0)
    assert summary["rounds_completed"] == 2 and summary["wall_time_s"] == 4.0
    assert summary["best_balanced_error"] == pytest.approx(0.3)
