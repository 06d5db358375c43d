"""The report on plain run folders, a single run, and failed or partial runs.

Run folders are written by hand here (the real single-run code is someone else's): a
small TOML writer and a formula for the metrics, so the table can be checked against an
independent computation with :mod:`statistics`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedimb.report import (
    _per_class_matrix,
    build_report,
    load_runs,
    summarize,
)

ROUNDS = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def toml_dumps(table: dict[str, Any]) -> str:
    """Minimal TOML writer (scalars and one level of tables), enough for these configs."""
    top = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    sub = []
    for k, v in table.items():
        if isinstance(v, dict):
            sub += ["", f"[{k}]", *(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())]
    return "\n".join(top + sub) + "\n"


def final_of(loss: str, cpc: int, seed: int) -> float:
    return {"ce": 0.5, "ldam": 0.3}[loss] + 0.15 * (cpc == 1) + 0.03 * seed


def curve_of(final: float) -> list[float]:
    """Error per round: starts at 0.9, dips below ``final`` at round 3, ends at ``final``."""
    values = [0.9 - (0.9 - final) * r / ROUNDS for r in range(ROUNDS + 1)]
    values[3] = final - 0.05  # the best round is not the last one
    return values


def write_run(
    folder: Path,
    loss: str = "ce",
    cpc: int = 2,
    seed: int = 0,
    *,
    status: str | None = "completed",
    metrics: bool = True,
    summary_numbers: bool = True,
    out_dir_key: bool = True,
) -> Path:
    """A results folder as the single-run code writes it (parts can be left out)."""
    folder.mkdir(parents=True)
    config = {
        "dataset": "digits",
        "num-rounds": ROUNDS,
        "seed": seed,
        "partition": {"name": "shards", "classes-per-client": cpc},
        "loss": {"name": loss},
        "strategy": {"name": "fedavg"},
    }
    if out_dir_key:
        config["out-dir"] = str(folder)  # differs per run, must not split groups
    (folder / "config.toml").write_text(toml_dumps(config))
    errors = curve_of(final_of(loss, cpc, seed))
    if metrics:
        rows = [
            {
                "round": r,
                "balanced_error": e,
                "accuracy": 1 - e,
                "per_class_error": [e - 0.2, e, e + 0.2],
                "worst_class_error": e + 0.2,
                # A long tail's shot groups (here: ldam's runs only; else every class is
                # many-shot).
                "many_shot_error": e - 0.1 if loss == "ldam" else e,
                "medium_shot_error": e if loss == "ldam" else None,
                "few_shot_error": e + 0.1 if loss == "ldam" else None,
                "train_loss": None if r == 0 else 1.0,
                "elapsed_s": 3.0 * r,
            }
            for r, e in enumerate(errors)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        summary: dict[str, Any] = {"status": status, "seed": seed, "num_rounds": ROUNDS}
        if status == "failed":
            summary["error"] = "ValueError: diverged"
        elif summary_numbers:
            summary.update(
                final_balanced_error=errors[-1],
                best_balanced_error=min(errors),
                best_round=3,
                rounds_completed=ROUNDS,
                wall_time_s=20.0 + seed,
            )
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    """2 losses x 2 splits x 2 seeds as plain run folders (no sweep.json)."""
    root = tmp_path / "runs"
    for loss in ("ce", "ldam"):
        for cpc in (1, 2):
            for seed in (0, 1):
                write_run(root / f"{loss}-{cpc}-{seed}", loss, cpc, seed)
    return root


def test_folder_of_runs_groups_by_differing_config_keys(runs_dir: Path) -> None:
    runset = load_runs(runs_dir)
    assert runset.kind == "runs"
    # seed and out-dir differ too but are per-run, not experiment keys.
    assert runset.group_keys == ["partition.classes-per-client", "loss.name"]

    paths = build_report(runs_dir, target_error=0.6)
    rows = read_csv(paths["csv"])
    assert len(rows) == 4
    finals_sorted = sorted(
        statistics.mean(final_of(loss, cpc, s) for s in (0, 1))
        for loss in ("ce", "ldam")
        for cpc in (1, 2)
    )
    assert [float(r["final_balanced_error_mean"]) for r in rows] == pytest.approx(finals_sorted)
    for row in rows:
        loss, cpc = row["loss.name"], int(row["partition.classes-per-client"])
        finals = [final_of(loss, cpc, s) for s in (0, 1)]
        bests = [min(curve_of(f)) for f in finals]
        assert row["n"] == "2" and row["failed"] == "0"
        assert float(row["final_balanced_error_std"]) == pytest.approx(statistics.stdev(finals))
        assert float(row["best_balanced_error_mean"]) == pytest.approx(statistics.mean(bests))
        assert float(row["best_balanced_error_std"]) == pytest.approx(statistics.stdev(bests))
        hits = [next((r for r, e in enumerate(curve_of(f)) if e <= 0.6), None) for f in finals]
        reached = [h for h in hits if h is not None]
        assert int(row["reached_target"]) == len(reached)
        if reached:
            assert float(row["rounds_to_target_mean"]) == pytest.approx(statistics.mean(reached))
        else:
            assert row["rounds_to_target_mean"] == ""
        assert float(row["wall_time_s_mean"]) == pytest.approx(20.5)
        worst = float(row["final_worst_class_error_mean"])
        assert worst == pytest.approx(statistics.mean(finals) + 0.2)
        assert float(row["final_worst_class_error_std"]) == pytest.approx(statistics.stdev(finals))
        few = row["final_few_shot_error_mean"]
        assert (
            (float(few) == pytest.approx(statistics.mean(finals) + 0.1))
            if loss == "ldam"
            else (few == "")
        )
        # ldam is lower in both splits, so it is the best of each.
        assert row["best_in_split"] == ("1" if loss == "ldam" else "0")

    md = paths["md"].read_text()
    assert md.count("| * |") == 2
    assert "| final BE | best BE | worst class | many-shot | medium-shot | few-shot |" in md
    assert md.count(" | - | ") == 2  # ce's rows: no few-shot class
    assert "within its split (partition.classes-per-client)" in md
    for key in ("curves", "per_class"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC


def test_per_class_heatmap_values_are_means_over_seeds(runs_dir: Path) -> None:
    rows = summarize(load_runs(runs_dir))
    kept, matrix = _per_class_matrix(rows)
    assert matrix.shape == (4, 3)
    for row, values in zip(kept, matrix, strict=True):
        loss, cpc = row.label["loss.name"], row.label["partition.classes-per-client"]
        finals = [final_of(loss, cpc, s) for s in (0, 1)]
        expected = [statistics.mean(f + d for f in finals) for d in (-0.2, 0.0, 0.2)]
        assert values == pytest.approx(expected)


def test_single_run_folder_reports(tmp_path: Path) -> None:
    run = write_run(tmp_path / "one", "ldam", 1, 0)
    paths = build_report(run)
    assert paths["csv"].parent == run
    [row] = read_csv(paths["csv"])
    assert row["n"] == "1"
    assert float(row["final_balanced_error_mean"]) == pytest.approx(final_of("ldam", 1, 0))
    assert row["final_balanced_error_std"] == ""
    # Nothing varies, so the headline config keys label the row.
    assert (row["dataset"], row["loss.name"], row["partition.name"]) == ("digits", "ldam", "shards")
    assert "| * | digits | shards | ldam | fedavg | 1 | 0 |" in paths["md"].read_text()
    assert paths["curves"].read_bytes()[:8] == PNG_MAGIC


def test_failed_and_partial_runs_are_counted_not_averaged(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "ok0", "ce", 2, 0, out_dir_key=False)
    write_run(root / "ok1", "ce", 2, 1, out_dir_key=False, summary_numbers=False)
    write_run(root / "bad", "ce", 2, 2, out_dir_key=False, status="failed", metrics=False)
    write_run(root / "live", "ce", 2, 3, out_dir_key=False, status=None)  # no summary yet
    (root / "empty").mkdir()  # not a run: ignored

    paths = build_report(root)
    [row] = read_csv(paths["csv"])
    finals = [final_of("ce", 2, 0), final_of("ce", 2, 1)]
    assert (row["n"], row["failed"], row["incomplete"]) == ("2", "1", "1")
    # ok1's summary has no numbers: they come from its metrics instead.
    assert float(row["final_balanced_error_mean"]) == pytest.approx(statistics.mean(finals))
    bests = [min(curve_of(f)) for f in finals]
    assert float(row["best_balanced_error_mean"]) == pytest.approx(statistics.mean(bests))
    # wall time: summary for ok0 (20.0), last elapsed_s for ok1 (3.0 * ROUNDS).
    assert float(row["wall_time_s_mean"]) == pytest.approx((20.0 + 3.0 * ROUNDS) / 2)
    md = paths["md"].read_text()
    assert "`bad` (failed): ValueError: diverged" in md
    assert "`live` (running)" in md


def test_group_with_only_failed_runs_sorts_last(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "a", "ce", 2, 0)
    write_run(root / "b", "ldam", 2, 0, status="failed", metrics=False)
    paths = build_report(root)
    rows = read_csv(paths["csv"])
    assert [r["loss.name"] for r in rows] == ["ce", "ldam"]
    assert rows[1]["n"] == "0" and rows[1]["final_balanced_error_mean"] == ""
    assert rows[0]["best_in_split"] == "1" and rows[1]["best_in_split"] == "0"


def test_report_without_any_metrics_still_writes_pictures(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", status="failed", metrics=False)
    paths = build_report(run)
    assert paths["curves"].read_bytes()[:8] == PNG_MAGIC
    assert paths["per_class"].read_bytes()[:8] == PNG_MAGIC
    assert read_csv(paths["csv"])[0]["failed"] == "1"


def test_partial_reach_of_target_is_shown_as_fraction(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root / "s0", "ce", 2, 0)  # final 0.50
    write_run(root / "s1", "ce", 2, 9)  # final 0.77, best 0.72
    target = 0.6
    paths = build_report(root, target_error=target)
    [row] = read_csv(paths["csv"])
    hit = next(r for r, e in enumerate(curve_of(final_of("ce", 2, 0))) if e <= target)
    assert row["reached_target"] == "1"
    assert float(row["rounds_to_target_mean"]) == pytest.approx(hit)
    assert f"| {hit:.1f} (1/2) |" in paths["md"].read_text()


def test_nan_errors_are_ignored(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r", summary_numbers=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last["balanced_error"] = None  # how results.py writes a NaN
    lines[-1] = json.dumps(last)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    [row] = summarize(load_runs(run))
    assert math.isnan(row.final_mean)
    assert row.best_mean == pytest.approx(min(curve_of(final_of("ce", 2, 0))[:-1]))


@pytest.mark.parametrize("bad", [-0.1, 1.5, True])
def test_bad_target_error(runs_dir: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="target_error"):
        build_report(runs_dir, target_error=bad)


def test_folder_without_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no run"):
        load_runs(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_runs(tmp_path / "missing")


def test_cli_report(runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedimb.cli import main

    assert main(["report", str(runs_dir), "--target-error", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "rounds to BE ≤ 0.6" in out and "report.csv" in out  # the table, then the files
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert main(["report", str(runs_dir), "--target-error", "2"]) == 2
    assert "target_error must be a number in [0, 1], got 2.0" in capsys.readouterr().err


def test_many_classes_heatmap(tmp_path: Path) -> None:
    run = write_run(tmp_path / "r")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    for row in rows:
        row["per_class_error"] = rng.uniform(size=100).tolist()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, matrix = _per_class_matrix(summarize(load_runs(run)))
    assert matrix[0] == pytest.approx(rows[-1]["per_class_error"])
    assert build_report(run)["per_class"].read_bytes()[:8] == PNG_MAGIC


def test_the_per_class_plot_names_the_classes_a_run_recorded(tmp_path):
    from types import SimpleNamespace

    from fedimb.report import _class_names
    from fedimb.results import atomic_write_json

    def runs(*folders):
        return [SimpleNamespace(runs=[SimpleNamespace(path=f) for f in folders])]

    bare, named, other, damaged = (tmp_path / n for n in ("bare", "named", "other", "damaged"))
    bare.mkdir()
    atomic_write_json(named / "partition.json", {"classes": ["cat", "dog"], "counts": []})
    atomic_write_json(other / "partition.json", {"classes": ["ant", "bee"], "counts": []})
    damaged.mkdir()
    (damaged / "partition.json").write_text('{"classes": [')
    assert _class_names(runs(bare, named, damaged), 2) == ["cat", "dog"]  # the bad file skipped
    assert _class_names(runs(named), 3) is None  # not the plot's columns: plain indices
    assert _class_names(runs(named, other), 2) is None  # two datasets' names: plain indices


def test_shot_columns_only_on_a_long_tail(tmp_path: Path) -> None:
    # ce's runs here: every class many-shot (balanced data), so no shot column at all.
    for seed in (0, 1):
        write_run(tmp_path / f"ce-s{seed}", "ce", seed=seed)
    md = build_report(tmp_path)["md"].read_text()
    # Three classes: a column of error per class follows, no shot group.
    per_class = " | ".join(f"error class {i}" for i in range(3))
    assert f"| final BE | best BE | worst class | {per_class} | wall time (s) |" in md
    assert "many-shot |" not in md
