"""The report's pictures: every line told apart, the legend clear of the data and inside
the picture, numbers in the heatmap's cells where they fit."""

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_report import write_run

from fedimb.report import _label_keys as label_keys
from fedimb.report import (
    curves_figure,
    load_runs,
    per_class_figure,
    run_curves_figure,
    series_styles,
    summarize,
)


def report_inputs(root: Path):
    runset = load_runs(root)
    return summarize(runset), label_keys(runset)


def test_more_than_ten_series_each_get_their_own_colour_and_line_style():
    styles = series_styles([f"series {i}" for i in range(45)])
    looks = [(s["color"], s["linestyle"], s["marker"]) for s in styles.values()]
    assert len(set(looks)) == 45
    assert styles["series 0"]["color"] == styles["series 10"]["color"]  # ten colours ...
    assert styles["series 0"]["linestyle"] != styles["series 10"]["linestyle"]  # ... then a style


def write_runs(root: Path, series: int, splits: int = 2) -> None:
    """``series`` learning rates x ``splits`` splits, one run each."""
    for i in range(series):
        for cpc in range(1, splits + 1):
            config = write_run(root / f"{i}-{cpc}", "ce", cpc) / "config.toml"
            config.write_text(f"lr = {0.01 * (i + 1):.2f}\n" + config.read_text())


@pytest.mark.parametrize("series", [2, 14, 45])
def test_the_curves_legend_lies_outside_every_panel_and_inside_the_picture(tmp_path, series):
    write_runs(tmp_path, series)
    fig = curves_figure(*report_inputs(tmp_path))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    picture = fig.bbox
    assert picture.x0 <= box.x0 and box.x1 <= picture.x1
    assert picture.y0 <= box.y0 and box.y1 <= picture.y1
    for ax in fig.axes:
        if ax.get_visible():
            assert not box.overlaps(ax.get_window_extent(renderer))
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    shown = {(ln.get_label(), ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len({tuple(look) for _, *look in shown}) == series  # one look per series


def test_heatmap_cells_show_their_values_for_a_compare_sized_report(tmp_path):
    # 24 groups x 3 classes: more than the old rule's 200 cells would have numbered.
    write_runs(tmp_path, 12)
    rows, keys = report_inputs(tmp_path)
    fig = per_class_figure(rows, keys)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 24 * 3 and all(t.replace(".", "").isdigit() for t in texts)


def test_heatmap_cells_too_narrow_for_a_number_stay_plain(tmp_path):
    import json

    run = write_run(tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["per_class_error"] = [0.5] * 100
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = per_class_figure(*report_inputs(run))
    assert len(fig.axes[0].texts) == 0


def run_rows(rounds: int, classes: int) -> list[dict]:
    return [
        {
            "round": r,
            "balanced_error": 0.9 - 0.1 * r,
            "worst_class_error": 1.0 - 0.05 * r,
            "per_class_error": [0.9 - 0.1 * r + 0.01 * c for c in range(classes)],
        }
        for r in range(rounds + 1)
    ]


def test_a_single_runs_curves_show_its_error_and_each_class_by_name():
    fig = run_curves_figure(run_rows(5, 3), ["cat", "dog", "eel"])
    balanced, per_class = fig.axes
    assert [line.get_label() for line in balanced.get_lines()] == ["balanced", "worst class"]
    assert [line.get_label() for line in per_class.get_lines()] == ["cat", "dog", "eel"]
    assert list(per_class.get_lines()[2].get_ydata()) == pytest.approx(
        [0.92 - 0.1 * r for r in range(6)]
    )
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["cat", "dog", "eel"]
    # Names that do not match the rows' classes: numbered; a hundred classes: no legend.
    assert [ln.get_label() for ln in run_curves_figure(run_rows(2, 2), ["a"]).axes[1].lines] == [
        "0",
        "1",
    ]
    assert run_curves_figure(run_rows(2, 100), None).legends == []
    assert run_curves_figure([], None) is None


@pytest.mark.slow
def test_fedimb_run_writes_its_own_curves(tmp_path):
    from fedimb.cli import main

    out = tmp_path / "run"
    args = ["run", "--engine", "inprocess", "--set", "num-clients=4", "--set", "num-rounds=2"]
    assert main([*args, "-q", "--out", str(out)]) == 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
