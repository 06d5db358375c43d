"""Sweeps: parsing, cell expansion, running (resume, failures, validation) and the report.

The single-run simulation is replaced by ``FakeRun``, which writes a plausible results
folder whose numbers follow a simple formula, so the report can be checked by hand.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from fedimb import progress as progress_mod
from fedimb.progress import RunProgress, SweepProgress
from fedimb.report import build_report
from fedimb.results import FolderBusy, claimed, read_json
from fedimb.sweep import (
    SWEEP_KEYS,
    Cell,
    Sweep,
    default_out_dir,
    expand,
    load_sweep,
    matches,
    parse_only,
    run_sweep,
)

ROUNDS = 4
LOSS_ERROR = {"ce": 0.6, "focal": 0.4, "ldam-drw": 0.5}


def final_error(loss: str, seed: int, cpc: int = 2) -> float:
    """The fake's final balanced error: loss effect + split effect + seed noise."""
    return LOSS_ERROR[loss] + (0.1 if cpc == 1 else 0.0) + 0.02 * seed


def error_at(round_: int, final: float) -> float:
    """The fake's curve: linear from 0.9 at round 0 down to ``final`` at the last round."""
    return 0.9 - (0.9 - final) * round_ / ROUNDS


def toml_dumps(table: dict[str, Any]) -> str:
    """Minimal TOML writer for the fake (scalars and one level of tables)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    sub = []
    for k, v in table.items():
        if isinstance(v, dict):
            sub += ["", f"[{k}]", *(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())]
    return "\n".join(top + sub) + "\n"


def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "dataset": "digits",
        "num-rounds": ROUNDS,
        "seed": 0,
        "partition": {"name": "shards", "classes-per-client": 2},
        "loss": {"name": "ce"},
        "strategy": {"name": "fedavg"},
    }
    for key, value in overrides.items():
        head, _, tail = key.partition(".")
        if tail:
            config.setdefault(head, {})[tail] = value
        else:
            config[head] = value
    return config


class FakeRun:
    """Stand-in for the run callable: writes config.toml, metrics.jsonl, summary.json."""

    def __init__(self, fail: set[tuple[str, int]] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail or set()

    def __call__(self, overrides: dict[str, Any], cell_dir: Path) -> None:
        self.calls.append(overrides)
        config = nest(overrides)
        loss, seed = config["loss"]["name"], config["seed"]
        cpc = config["partition"]["classes-per-client"]
        (cell_dir / "config.toml").write_text(toml_dumps(config))
        if (loss, seed) in self.fail:
            raise RuntimeError(f"boom {loss} {seed}")
        final = final_error(loss, seed, cpc)
        rows = [
            {
                "round": r,
                "balanced_error": error_at(r, final),
                "accuracy": 1 - error_at(r, final),
                "per_class_error": [error_at(r, final) - 0.1, error_at(r, final) + 0.1],
                "worst_class_error": error_at(r, final) + 0.1,
                "train_loss": None if r == 0 else 1.0 / r,
                "elapsed_s": 2.0 * r,
            }
            for r in range(ROUNDS + 1)
        ]
        (cell_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {
            "status": "completed",
            "final_balanced_error": final,
            "best_balanced_error": final,
            "best_round": ROUNDS,
            "num_rounds": ROUNDS,
            "rounds_completed": ROUNDS,
            "wall_time_s": 10.0 + seed,
            "seed": seed,
        }
        (cell_dir / "summary.json").write_text(json.dumps(summary))


def write_sweep(tmp_path: Path, body: str, base: str = "base.toml") -> Path:
    (tmp_path / "base.toml").write_text('dataset = "digits"\n')
    path = tmp_path / "exp.toml"
    path.write_text(f'base = "{base}"\n' + body)
    return path


TINY = """
name = "tiny"
target-error = 0.7
[set]
engine = "inprocess"
[grid]
"loss.name" = ["ce", "focal"]
seed = [0, 1]
"""


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def first_round_below(final: float, target: float) -> int:
    return next(r for r in range(ROUNDS + 1) if error_at(r, final) <= target)


# --------------------------------------------------------------------------- load_sweep


def test_load_sweep_resolves_base_and_flattens_dotted_keys(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        "target-error = 0.3\n[set]\nloss.gamma = 2.0\n"
        '[grid]\nloss.name = ["ce", "focal"]\n"seed" = [0]\n',
    )
    sweep = load_sweep(path)
    assert sweep.base == (tmp_path / "base.toml").resolve()
    assert sweep.name == "exp"  # default: the file's stem
    assert sweep.target_error == pytest.approx(0.3)
    assert sweep.fixed == {"loss.gamma": 2.0}
    assert sweep.grid == {"loss.name": ["ce", "focal"], "seed": [0]}


def test_a_sweep_anywhere_may_name_one_of_fedimbs_configs_as_base(tmp_path: Path) -> None:
    from fedimb.config import DEFAULT_CONFIG

    (tmp_path / "s.toml").write_text('base = "quickstart.toml"\n[grid]\nseed = [0]\n')
    assert load_sweep(tmp_path / "s.toml").base == DEFAULT_CONFIG
    (tmp_path / "quickstart.toml").write_text("num-rounds = 3\n")  # a file beside wins
    assert load_sweep(tmp_path / "s.toml").base == (tmp_path / "quickstart.toml").resolve()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('name = "x"\n[grid]\nseed = [0]\n', "needs 'base"),
        ('base = "nope.toml"\n[grid]\nseed = [0]\n', "not found"),
        ('base = "base.toml"\n[grid]\n', "grid is empty"),
        ('base = "base.toml"\n', "no \\[grid\\]"),
        ('base = "base.toml"\n[grid]\nseed = 3\n', "'seed' must map to a non-empty list"),
        ('base = "base.toml"\n[grid]\nseed = []\n', "'seed' must map to a non-empty list"),
        ('base = "base.toml"\n[grid]\nseed = [1, 1]\n', "same value twice"),
        ('base = "base.toml"\nrounds = 3\n[grid]\nseed = [0]\n', "unknown key"),
        ('base = "base.toml"\n[set]\nseed = 1\n[grid]\nseed = [0]\n', "both fixed"),
        ('base = "base.toml"\ntarget-error = 2\n[grid]\nseed = [0]\n', "target-error"),
        ('base = "base.toml"\nname = "a b/c"\n[grid]\nseed = [0]\n', "folder-safe"),
    ],
)
def test_load_sweep_rejects_bad_files(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "base.toml").write_text("")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_sweep(path)


def test_unknown_key_message_lists_valid_keys(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "rounds = 3\n[grid]\nseed = [0]\n")
    with pytest.raises(ValueError) as info:
        load_sweep(path)
    assert "rounds" in str(info.value)
    assert all(key in str(info.value) for key in SWEEP_KEYS)


# --------------------------------------------------------------------------- expand


def test_expand_is_the_ordered_product_with_safe_unique_names(tmp_path: Path) -> None:
    sweep = Sweep(
        base=tmp_path / "b.toml",
        name="s",
        fixed={"engine": "inprocess"},
        grid={
            "loss.name": ["ce", "focal"],
            "partition.classes-per-client": [1, 2],
            "seed": [0, 1, 2],
        },
    )
    cells = expand(sweep)
    assert len(cells) == 2 * 2 * 3
    expected = [
        (loss, cpc, seed) for loss in ("ce", "focal") for cpc in (1, 2) for seed in (0, 1, 2)
    ]
    got = [
        (c.overrides["loss.name"], c.overrides["partition.classes-per-client"], c.overrides["seed"])
        for c in cells
    ]
    assert got == expected
    assert all(c.overrides["engine"] == "inprocess" for c in cells)
    assert len({c.name for c in cells}) == len(cells)
    assert cells[0].name == "loss.name=ce,partition.classes-per-client=1,seed=0"
    assert all(re.fullmatch(r"[A-Za-z0-9._=,+-]+", c.name) for c in cells)
    assert expand(sweep) == cells  # deterministic


def test_expand_disambiguates_values_that_slug_alike(tmp_path: Path) -> None:
    sweep = Sweep(base=tmp_path, name="s", grid={"strategy.name": ["pkg/mod:S", "pkg_mod_S"]})
    names = [c.name for c in expand(sweep)]
    assert len(set(names)) == 2
    assert all("/" not in n and ":" not in n for n in names)


def test_default_out_dir(tmp_path: Path) -> None:
    assert default_out_dir(Sweep(base=tmp_path, name="abc")) == Path("results") / "abc"


# --------------------------------------------------------------------------- run_sweep


def test_tiny_sweep_writes_cells_report_and_correct_numbers(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    out = tmp_path / "out"
    fake = FakeRun()
    results = run_sweep(sweep, out, fake, progress=False)

    assert [r.status for r in results] == ["completed"] * 4
    assert len(fake.calls) == 4
    assert all(call["engine"] == "inprocess" for call in fake.calls)
    for name in ("report.csv", "report.md", "curves.png", "per_class.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = read_json(out / "sweep.json")
    assert [c["status"] for c in state["cells"]] == ["completed"] * 4
    assert state["sweep"]["grid"] == {"loss.name": ["ce", "focal"], "seed": [0, 1]}

    rows = read_csv(out / "report.csv")
    assert [r["loss.name"] for r in rows] == ["focal", "ce"]  # sorted by final error
    for row in rows:
        finals = [final_error(row["loss.name"], s) for s in (0, 1)]
        assert int(row["n"]) == 2
        assert int(row["failed"]) == 0
        assert float(row["final_balanced_error_mean"]) == pytest.approx(statistics.mean(finals))
        assert float(row["final_balanced_error_std"]) == pytest.approx(statistics.stdev(finals))
        assert float(row["best_balanced_error_mean"]) == pytest.approx(statistics.mean(finals))
        rounds = [first_round_below(f, 0.7) for f in finals]
        assert float(row["rounds_to_target_mean"]) == pytest.approx(statistics.mean(rounds))
        assert float(row["wall_time_s_mean"]) == pytest.approx(statistics.mean([10.0, 11.0]))
    # No partition key in the grid: one split, so exactly one best row.
    assert [r["best_in_split"] for r in rows] == ["1", "0"]
    assert "| * | focal |" in (out / "report.md").read_text()


def test_rerun_skips_completed_cells_and_report_rebuilds_identically(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    out = tmp_path / "out"
    run_sweep(sweep, out, FakeRun(), progress=False)
    first_csv = (out / "report.csv").read_text()

    again = FakeRun()
    results = run_sweep(sweep, out, again, progress=False)
    assert again.calls == []
    assert all(r.skipped and r.status == "completed" for r in results)

    (out / "loss.name=ce,seed=1" / "summary.json").unlink()
    third = FakeRun()
    run_sweep(sweep, out, third, progress=False)
    assert third.calls == [{"engine": "inprocess", "loss.name": "ce", "seed": 1}]

    for name in ("report.csv", "report.md", "curves.png", "per_class.png"):
        (out / name).unlink()
    paths = build_report(out)
    assert paths["csv"].read_text() == first_csv
    assert paths["curves"].is_file() and paths["per_class"].is_file()


def test_failing_cell_is_recorded_and_others_complete(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    out = tmp_path / "out"
    fake = FakeRun(fail={("focal", 1)})
    results = run_sweep(sweep, out, fake, progress=False)

    assert len(fake.calls) == 4
    by_name = {r.name: r for r in results}
    bad = by_name["loss.name=focal,seed=1"]
    assert bad.status == "failed"
    assert bad.error == "RuntimeError: boom focal 1"
    summary = read_json(out / bad.name / "summary.json")
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: boom focal 1"
    assert "RuntimeError: boom focal 1" in (out / bad.name / "traceback.txt").read_text()
    assert sum(r.status == "completed" for r in results) == 3
    state = {c["name"]: c["status"] for c in read_json(out / "sweep.json")["cells"]}
    assert state[bad.name] == "failed"

    rows = {r["loss.name"]: r for r in read_csv(out / "report.csv")}
    assert (rows["focal"]["n"], rows["focal"]["failed"]) == ("1", "1")
    assert float(rows["focal"]["final_balanced_error_mean"]) == pytest.approx(
        final_error("focal", 0)
    )
    assert rows["focal"]["final_balanced_error_std"] == ""  # one seed: no std
    assert "boom focal 1" in (out / "report.md").read_text()

    # A re-run retries only the failed cell, and a success clears the old traceback.
    retry = FakeRun()
    run_sweep(sweep, out, retry, progress=False)
    assert retry.calls == [{"engine": "inprocess", "loss.name": "focal", "seed": 1}]
    assert not (out / bad.name / "traceback.txt").exists()
    assert read_json(out / bad.name / "summary.json")["status"] == "completed"


def test_validation_failure_writes_nothing(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    out = tmp_path / "out"
    fake = FakeRun()

    def validate(overrides: dict[str, Any], cell_dir: Path) -> None:
        if overrides["loss.name"] == "focal" and overrides["seed"] == 1:
            raise ValueError("loss.gamma must be > 0")

    with pytest.raises(ValueError, match=r"loss\.name=focal,seed=1.*loss\.gamma must be > 0"):
        run_sweep(sweep, out, fake, validate_cell=validate, progress=False)
    assert fake.calls == []
    assert not out.exists()


def test_validate_cell_is_called_for_every_cell_before_running(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    seen: list[tuple[dict[str, Any], Path]] = []
    fake = FakeRun()

    def validate(overrides: dict[str, Any], cell_dir: Path) -> None:
        assert fake.calls == []  # nothing has run yet
        seen.append((overrides, cell_dir))

    run_sweep(sweep, tmp_path / "out", fake, validate_cell=validate, progress=False)
    assert seen == [(c.overrides, tmp_path / "out" / c.name) for c in expand(sweep)]


def test_quiet_mode_prints_one_line_per_cell(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    run_sweep(sweep, tmp_path / "out", FakeRun(), progress=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiny [")]
    assert len(lines) == 4
    assert lines[0] == (
        f"tiny [1/4] loss.name=ce,seed=0: completed final_balanced_error="
        f"{final_error('ce', 0):.4f} (10.0 s)"
    )


def test_keyboard_interrupt_marks_cell_and_propagates(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    out = tmp_path / "out"

    def interrupted(overrides: dict[str, Any], cell_dir: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, interrupted, progress=False)
    cells = read_json(out / "sweep.json")["cells"]
    assert [c["status"] for c in cells] == ["interrupted", "pending", "pending", "pending"]
    # The report can still be built mid-sweep and says which cells are not done.
    md = build_report(out)["md"].read_text()
    assert "`loss.name=ce,seed=0` (interrupted)" in md
    assert "`loss.name=focal,seed=1` (pending)" in md


# --------------------------------------------------------------------------- progress


def test_run_progress_plain_lines(capsys: pytest.CaptureFixture) -> None:
    with RunProgress(2, "run", enabled=True) as bar:  # pytest's stdout is not a TTY
        bar.update(1, 0.5)
        bar.update(2, float("nan"))
    assert capsys.readouterr().out.splitlines() == [
        "run round 1/2 balanced_error=0.5000",
        "run round 2/2 balanced_error=-",
    ]


def test_bars_nest_into_one_display_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_mod, "stdout_is_terminal", lambda: True)
    with SweepProgress(1, "sweep") as outer:
        assert progress_mod._ACTIVE is not None
        with RunProgress(3, "cell") as inner:
            assert inner._progress is outer._progress  # a row of the same display
            inner.update(1, 0.4)
        assert len(outer._progress.tasks) == 1  # the finished run's row is gone
        outer.update(1, "cell", "completed", 0.4)
    assert progress_mod._ACTIVE is None


def test_progress_rejects_bad_total() -> None:
    with pytest.raises(ValueError, match="total"):
        RunProgress(-1, "x")


# --------------------------------------------------------------------------- pieces

PAIRED = """
[grid]
"loss.name" = ["ce", "focal", "ldam-drw"]
"model.cosine-head" = [false, true]
seed = [0, 1]
[[exclude]]
"loss.name" = "ldam-drw"
"model.cosine-head" = false
[[exclude]]
"loss.name" = ["focal", "class-balanced"]
"model.cosine-head" = true
"""


def test_exclude_drops_the_matching_combinations(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, PAIRED))
    pairs = [(c.overrides["loss.name"], c.overrides["model.cosine-head"]) for c in expand(sweep)]
    kept = [("ce", False), ("ce", True), ("focal", False), ("ldam-drw", True)]
    assert pairs == [p for p in kept for _ in (0, 1)]  # each for seeds 0 and 1
    assert sweep.to_json()["exclude"][0] == {
        "loss.name": ["ldam-drw"],
        "model.cosine-head": [False],
    }


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('[grid]\nseed = [0]\n[[exclude]]\n"loss.name" = "ce"\n', "'loss.name' is not a grid key"),
        ("[grid]\nseed = [0]\n[[exclude]]\nseed = 0\n", "leaves no cell"),
        ("exclude = 3\n[grid]\nseed = [0]\n", r"\[\[exclude\]\] tables"),
    ],
)
def test_a_bad_exclude_is_refused(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_sweep(write_sweep(tmp_path, body))


def test_only_selects_values_of_a_key_and_narrows_by_keys(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, PAIRED))
    only = parse_only(["loss.name=ce", "loss.name=ldam-drw", "model.cosine-head=true"], sweep)
    assert only == {"loss.name": ["ce", "ldam-drw"], "model.cosine-head": [True]}
    out, fake = tmp_path / "out", FakeRun()
    results = run_sweep(sweep, out, fake, progress=False, only=only | {"seed": [1]})
    assert [(c["loss.name"], c["seed"]) for c in fake.calls] == [("ce", 1), ("ldam-drw", 1)]
    assert [r.status for r in results] == ["completed", "completed"]
    # The other cells stay listed: the report shows what is still missing.
    cells = read_json(out / "sweep.json")["cells"]
    assert len(cells) == 8
    assert sum(c["status"] == "completed" for c in cells) == 2
    assert sum(c["status"] == "pending" for c in cells) == 6
    rows = read_csv(out / "report.csv")
    assert sorted(r["loss.name"] for r in rows if r["n"] == "1") == ["ce", "ldam-drw"]


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["loss=ce"], r"'loss' is not a grid key; grid keys: \['loss.name'"),
        (["loss.name=cee"], r"loss.name='cee' is not in the grid; allowed: \['ce', 'focal'"),
        (["seed=0.0"], "seed=0.0 is not in the grid"),  # 0.0 is not the grid's 0
        (["seed"], "expected KEY=VALUE"),
        (["loss.name=ldam-drw", "model.cosine-head=false"], "selects no cell"),
    ],
)
def test_a_bad_only_says_what_is_allowed(tmp_path: Path, items: list[str], match: str) -> None:
    sweep = load_sweep(write_sweep(tmp_path, PAIRED))
    with pytest.raises(ValueError, match=match):
        parse_only(items, sweep)


def test_sweeps_in_one_folder_leave_a_cell_to_the_process_that_holds_it(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    out = tmp_path / "out"
    held = out / "loss.name=ce,seed=1"
    fake = FakeRun()
    # Another sweep's shared hold on the folder, and its claim on one cell.
    with claimed(out, shared=True), claimed(held):
        results = run_sweep(sweep, out, fake, progress=False)
        state = {c["name"]: c["status"] for c in read_json(out / "sweep.json")["cells"]}
    ran = [(c["loss.name"], c["seed"]) for c in fake.calls]
    assert ran == [("ce", 0), ("focal", 0), ("focal", 1)]
    busy = next(r for r in results if r.name == held.name)
    assert busy.skipped and busy.status == "running elsewhere"
    assert state[held.name] == "pending" and list(state.values()).count("completed") == 3
    # A sole hold (a run writing there) keeps a sweep out.
    with claimed(out), pytest.raises(FolderBusy, match="another fedimb process"):
        run_sweep(sweep, out, FakeRun(), progress=False)


def test_a_cell_finished_elsewhere_meanwhile_is_not_run_again(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, TINY))
    fake = FakeRun()
    asked: list[str] = []

    def is_done(overrides: dict[str, Any], cell_dir: Path) -> bool:
        # The first look says not done; by the second (under the cell's claim) another
        # sweep has finished it.
        asked.append(cell_dir.name)
        return asked.count(cell_dir.name) == 2

    results = run_sweep(sweep, tmp_path / "out", fake, progress=False, is_done=is_done)
    assert fake.calls == [] and all(r.skipped for r in results)


def test_the_science_sweeps_expand_to_valid_cells() -> None:
    from fedimb.config import DEFAULT_CONFIG, ConfigError, load_config

    counts = {}
    for path in sorted((DEFAULT_CONFIG.parent / "science").glob("*.toml")):
        sweep = load_sweep(path)
        counts[path.stem] = len(expand(sweep))
        for cell in expand(sweep):
            try:
                load_config(sweep.base, cell.overrides)
            except ConfigError as exc:  # the strategies table waits for its two losses
                assert "unknown loss 'BEST-" in str(exc), (cell.name, exc)
    # 2 splits x 9 losses (LDAM-DRW and its ce control on the cosine head) x 3 seeds;
    # NIID-Bench: 2 splits x 4 strategies x 3 seeds.
    assert counts["cifar10-fedavg"] == 54 and counts["niid-bench-anchor"] == 24
    fedavg = load_sweep(DEFAULT_CONFIG.parent / "science" / "cifar10-fedavg.toml")
    first = parse_only(["partition.classes-per-client=2", "seed=0"], fedavg)
    chosen = [c.overrides for c in expand(fedavg) if matches(c.overrides, first)]
    assert len(chosen) == 9 and len({c["loss.name"] for c in chosen}) == 8  # ce: two heads
    assert {c["loss.name"] for c in chosen if c["model.cosine-head"]} == {"ce", "ldam-drw"}


@pytest.mark.slow
def test_a_committed_cell_folder_counts_as_done_on_another_machine(tmp_path, capsys) -> None:
    # Real digits runs through the command line: a cell folder as committed to a ledger
    # (no checkpoint, no clients.jsonl, no partition.json), read where the data lives
    # elsewhere (another data-root), is skipped, and the report includes it.
    from fedimb.cli import main

    sweep = write_sweep(
        tmp_path,
        '[set]\nengine = "inprocess"\nnum-rounds = 2\nnum-clients = 4\n'
        '[grid]\n"loss.name" = ["ce", "focal"]\nseed = [0, 1]\n',
        base="quickstart.toml",
    )
    out = tmp_path / "ledger"
    picked = ["--only", "loss.name=ce", "--only", "seed=1"]
    assert main(["sweep", str(sweep), "--out", str(out), "-q", *picked]) == 0
    cell = out / "loss.name=ce,seed=1"
    assert sorted(p.parent.name for p in out.glob("*/summary.json")) == [cell.name]
    for name in ("checkpoint.pt", "clients.jsonl", "partition.json"):
        (cell / name).unlink()
    kept = {p.name: p.read_bytes() for p in cell.iterdir()}

    elsewhere = ["--set", "data-root=/elsewhere/data", "--only", "seed=1"]
    capsys.readouterr()
    assert main(["sweep", str(sweep), "--out", str(out), "-q", *elsewhere]) == 0
    assert "2 cells completed, 0 failed" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in cell.iterdir()} == kept  # not run again
    assert (out / "loss.name=focal,seed=1" / "summary.json").is_file()
    rows = {r["loss.name"]: r for r in read_csv(out / "report.csv")}
    assert rows["ce"]["n"] == rows["focal"]["n"] == "1"
    assert float(rows["ce"]["final_balanced_error_mean"]) == pytest.approx(
        read_json(cell / "summary.json")["final_balanced_error"]
    )
    assert main(["sweep", str(sweep), "--out", str(out), "--only", "seed=2"]) == 2
    assert "seed=2 is not in the grid; allowed: [0, 1]" in capsys.readouterr().err


def test_cell_dataclass_is_frozen() -> None:
    cell = Cell("a", {"seed": 0})
    with pytest.raises(AttributeError):
        cell.name = "b"  # type: ignore[misc]
