"""format_counts and plot_counts_heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedimb.data.inspect import format_counts, plot_counts_heatmap, summarize_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_counts(clients: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 50, size=(clients, classes))
    counts[rng.random((clients, classes)) < 0.7] = 0  # mostly label-skewed
    counts[:, 0] += 1  # every client holds at least one class
    return counts


def test_small_table_rows_and_summary():
    counts = np.array([[5, 0, 3], [0, 7, 0]])
    text = format_counts(counts, ["cat", "dog", "eel"])
    lines = text.splitlines()
    assert lines[0].split() == ["client", "cat", "dog", "eel", "total", "#cls"]
    assert lines[1].split() == ["0", "5", "0", "3", "8", "2"]
    assert lines[2].split() == ["1", "0", "7", "0", "7", "1"]
    assert lines[3].split() == ["all", "5", "7", "3", "15", "3"]  # per class, all clients
    assert "clients: 2" in text and "samples: 15" in text
    assert "min 7" in text and "max 8" in text


def test_many_clients_are_truncated_with_summary():
    counts = random_counts(300, 10)
    text = format_counts(counts, [f"c{i}" for i in range(10)], max_rows=20)
    rows = [ln for ln in text.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [int(r.split()[0]) for r in rows] == list(range(20))
    assert "280 more clients" in text
    totals = next(ln for ln in text.splitlines() if ln.split()[:1] == ["all"]).split()
    assert [int(t) for t in totals[1:11]] == counts.sum(axis=0).tolist()  # all 300 clients
    sizes = counts.sum(1)
    held = (counts > 0).sum(1)
    assert f"median {np.median(sizes):g}" in text
    assert f"min {sizes.min()}" in text and f"max {sizes.max()}" in text
    assert f"mean {held.mean():.2f}" in text


def test_many_classes_list_top_classes():
    counts = np.zeros((3, 100), dtype=int)
    counts[0, [5, 42]] = [10, 30]
    counts[1, 99] = 4
    counts[2, :7] = np.arange(1, 8)
    text = format_counts(counts, [f"k{i}" for i in range(100)])
    lines = text.splitlines()
    assert "k42(30), k5(10)" in lines[1]
    assert lines[2].rstrip().endswith("k99(4)")
    assert "k6(7), k5(6), k4(5), k3(4), k2(3)" in lines[3] and "k1(" not in lines[3]


def test_summarize_counts_independent():
    counts = random_counts(37, 10, seed=3)
    s = summarize_counts(counts)
    sizes = [int(sum(r)) for r in counts.tolist()]
    assert s["clients"] == 37 and s["samples"] == sum(sizes)
    assert s["size_min"] == min(sizes) and s["size_max"] == max(sizes)
    assert s["classes_max"] == max(sum(1 for v in r if v) for r in counts.tolist())


def test_format_errors():
    with pytest.raises(ValueError, match="class names"):
        format_counts(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="2-D"):
        format_counts(np.zeros(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="max_rows"):
        format_counts(np.ones((2, 2)), ["a", "b"], max_rows=0)


@pytest.mark.parametrize(("clients", "classes"), [(10, 10), (1000, 10), (50, 100)])
def test_heatmap_writes_png(tmp_path: Path, clients: int, classes: int):
    out = tmp_path / "sub" / "heat.png"
    got = plot_counts_heatmap(
        random_counts(clients, classes), [str(i) for i in range(classes)], out
    )
    assert got == out and out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["heat.png"], "no temp file left"


def test_heatmap_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from matplotlib.figure import Figure

    out = tmp_path / "heat.png"
    out.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_counts_heatmap(random_counts(5, 3), ["a", "b", "c"], out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]


def test_heatmap_colours_a_long_tail_on_a_log_scale(tmp_path: Path, monkeypatch):
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))
    )
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    tail = np.diag([5000 // 2**i for i in range(10)])  # 5000 .. 9: a CIFAR-10-LT-like tail
    plot_counts_heatmap(tail, names, tmp_path / "tail.png")
    plot_counts_heatmap(random_counts(8, 10), names, tmp_path / "flat.png")
    (tail_ax, *_), (flat_ax, *_) = (fig.axes for fig in drawn)
    assert isinstance(tail_ax.images[0].norm, LogNorm)
    assert not isinstance(flat_ax.images[0].norm, LogNorm)  # 1..50: linear
    # Ten long class names would overlap side by side: they are turned upright.
    assert {t.get_rotation() for t in tail_ax.get_xticklabels()} == {90.0}
