"""Sweep methods: named sets of keys as one axis, grouped by their label in the report,
and the per-class columns of few-class reports."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from test_sweep import FakeRun, final_error, read_csv, write_sweep

from fedimb.results import read_json
from fedimb.sweep import expand, load_sweep, run_sweep

METHODS = """
name = "methods"
[methods]
ERM = { "loss.name" = "ce" }
Focal-CB = { loss = { name = "focal", base = "softmax" } }
[grid]
seed = [0, 1]
"""


def test_methods_are_the_first_axis_and_set_their_keys_together(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, METHODS))
    cells = expand(sweep)
    assert [c.name for c in cells] == [
        "method=ERM,seed=0",
        "method=ERM,seed=1",
        "method=Focal-CB,seed=0",
        "method=Focal-CB,seed=1",
    ]
    assert cells[2].overrides == {"loss.name": "focal", "loss.base": "softmax", "seed": 0}
    assert [c.method for c in cells] == ["ERM", "ERM", "Focal-CB", "Focal-CB"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('[methods]\nA = { "loss.name" = "ce" }\n[grid]\n"loss.name" = ["focal"]\n', "one place"),
        ("[methods]\nA = {}\n[grid]\nseed = [0]\n", "sets no key"),
        ('[methods]\n"a b" = { seed = 1 }\n[grid]\nseed = [0]\n', "folder-safe"),
        ('[methods]\nA = "ce"\n[grid]\nseed = [0]\n', "table of 'Label ="),
    ],
)
def test_bad_methods_are_refused(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_sweep(write_sweep(tmp_path, body))


def test_the_report_groups_by_method_with_a_column_per_class(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_sweep(load_sweep(write_sweep(tmp_path, METHODS)), out, FakeRun(), progress=False)
    assert [c["method"] for c in read_json(out / "sweep.json")["cells"]][::2] == [
        "ERM",
        "Focal-CB",
    ]
    rows = read_csv(out / "report.csv")
    assert [r["method"] for r in rows] == ["Focal-CB", "ERM"]  # by final error
    for row in rows:
        finals = [final_error("focal" if row["method"] == "Focal-CB" else "ce", s) for s in (0, 1)]
        # The fake's two classes sit 0.1 below and above the balanced error.
        low = float(row["final_error_class 0_mean"])
        assert low == pytest.approx(statistics.mean(finals) - 0.1)
        assert float(row["final_error_class 1_mean"]) == pytest.approx(low + 0.2)
    table = (out / "report.md").read_text()
    assert "| method | n | failed | final BE | best BE | worst class | error class 0 |" in table


def test_published_numbers_stand_beside_the_methods_own(tmp_path: Path) -> None:
    body = METHODS + (
        '[reference]\nsource = "A paper"\nERM = { balanced = 0.5, "class 0" = 0.25 }\n'
    )
    out = tmp_path / "out"
    run_sweep(load_sweep(write_sweep(tmp_path, body)), out, FakeRun(), progress=False)
    table = (out / "report.md").read_text()
    assert "## Beside the published numbers (A paper)" in table
    ours = statistics.mean(final_error("ce", s) for s in (0, 1))
    mine, low = 100 * ours, 100 * (ours - 0.1)
    assert (
        f"| ERM | {mine:.2f} / 50.00 / {mine - 50:+.2f} | {low:.2f} / 25.00 / {low - 25:+.2f} |"
        in table
    )
    assert "| Focal-CB |" not in table.split("## Beside")[1]  # no published row: left out


@pytest.mark.parametrize(
    ("reference", "match"),
    [
        ("X = { balanced = 0.1 }", "'X' is not a method"),
        ("ERM = { balanced = 36.8 }", r"errors in \[0, 1\]"),
        ("source = 3", "source must be a string"),
    ],
)
def test_bad_references_are_refused(tmp_path: Path, reference: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_sweep(write_sweep(tmp_path, METHODS + "[reference]\n" + reference + "\n"))
