"""A new user's first contact: quiet logs without a terminal, the hint after a small Ray
run, the configs found from an installed wheel, Flower-side config errors, dependencies."""

import pytest

from fedimb import cli
from fedimb.cli import main
from fedimb.progress import RunProgress, SweepProgress


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
