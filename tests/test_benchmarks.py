"""The benchmark's stock baselines feed the same numbers whichever data path they use."""

import sys
from pathlib import Path

import pytest
import torch

from fedimb.data.datasets import Dataset, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
bench_round = pytest.importorskip("bench_round")


def _rgb_dataset() -> Dataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 5, 4), generator=gen, dtype=torch.uint8)
    y = torch.arange(12) % 3
    return Dataset(
        "rgb", x, y, x[:2], y[:2], ["a", "b", "c"], (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), 255.0
    )


@pytest.mark.parametrize("make", [lambda: load_dataset("digits", None), _rgb_dataset])
def test_quickstart_images_equal_the_normalised_tensors(make):
    """Per-sample ToTensor + Normalize of PIL images (Flower's quickstart) gives the
    tensors of ``Dataset.to_float`` (8-bit 0..16 digits and 0..255 RGB alike)."""
    dataset = make()
    idx = torch.tensor([0, 3, 5, 7])
    images = bench_round.QuickstartImages(dataset, idx)
    assert len(images) == 4
    want = dataset.to_float(dataset.x_train[idx])
    for i in range(4):
        x, y = images[i]
        torch.testing.assert_close(x, want[i], rtol=1e-5, atol=1e-5)
        assert int(y) == int(dataset.y_train[idx[i]])


def test_unfolded_convolution_equals_conv2d_also_under_vmap():
    """The kernel probe's ``unfold`` expression computes the same convolution, per client."""
    conv_kernels = pytest.importorskip("conv_kernels")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, 7, 6, generator=gen, dtype=torch.float64)  # clients, batch, C, H, W
    w = torch.randn(3, 5, 2, 5, 5, generator=gen, dtype=torch.float64)
    want = torch.stack([torch.nn.functional.conv2d(x[k], w[k], padding=2) for k in range(3)])
    got = torch.func.vmap(lambda xk, wk: conv_kernels.unfold_conv2d(xk, wk, padding=2))(x, w)
    assert got.shape == (3, 4, 5, 7, 6)
    torch.testing.assert_close(got, want)
    unpadded = conv_kernels.unfold_conv2d(x[0], w[0], padding=0)
    torch.testing.assert_close(unpadded, torch.nn.functional.conv2d(x[0], w[0]))


def test_aggregate_benchmark_reports_both_means_and_their_equality(tmp_path):
    import json

    bench_aggregate = pytest.importorskip("bench_aggregate")
    out = tmp_path / "aggregate.json"
    assert bench_aggregate.main(["--model", "mlp", "--clients", "3", "--repeats", "1",
                                 "--threads", "1", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["replies"], r["threads"]) for r in rows] == [("in-process", 1), ("plain", 1)]
    assert all(r["bit_equal"] and r["flower_s"] > 0 and r["torch_s"] > 0 for r in rows)


def test_step_shapes_are_the_vectorised_trainers_steps():
    """benchmarks/step_shapes.py counts the (clients, batch length) the trainer runs."""
    import numpy as np

    from fedimb.batched import _StackedPlan
    from fedimb.losses import make_loss
    from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan

    step_shapes = pytest.importorskip("step_shapes")
    settings = TrainSettings(batch_size=8)
    jobs = []
    for pid, n in enumerate([19, 24, 7, 16, 3]):
        y = np.arange(n) % 2
        plan = make_plan(y, settings, client_rng(0, 1, pid))
        x = torch.zeros(n, 2)
        jobs.append(ClientJob(x, torch.as_tensor(y), make_loss("ce", np.bincount(y)), plan))
    stacked = _StackedPlan(jobs, settings.batch_size, torch.device("cpu"))
    trained = {
        (len(jobs) if members is None else len(members), size)
        for members, size in zip(stacked.members, stacked.sizes, strict=True)
    }
    assert trained == {(5, 8), (3, 8), (2, 8)}  # 19: 8,8,3; 24: 8,8,8; 7; 16: 8,8; 3
    assert step_shapes.step_shapes([job.plan for job in jobs]) == trained


def test_the_limit_setting_trains_the_workloads_images_on_synthetic_data():
    """``limit``: every client full steps, as many images per round as the workload."""
    w = bench_round.Workload(clients=5, rounds=2, batch_size=16)
    out = bench_round.run_limit(w)
    fed = bench_round.load_federation(w, "cpu")
    per_round = bench_round.images_per_round(w, fed)
    assert out["images_per_round"] == per_round
    assert out["partition"] == bench_round.partition_digest(fed.parts)
    steps = out["limit_steps_per_round"]
    assert (steps - 1) * 5 * 16 < per_round <= steps * 5 * 16
    assert len(out["round_end"]) == 3 and out["round_end"] == sorted(out["round_end"])
    ratios = bench_round._ratios({"fedimb": {"round_s": 0.3}, "limit": {"round_s": 0.1}})
    assert ratios["round_vs_step_limit"] == 3.0


def test_bench_pfl_builds_pfls_workload_as_a_valid_fedimb_config():
    import argparse

    from fedimb.config import load_config

    bench_pfl = pytest.importorskip("bench_pfl")
    args = argparse.Namespace(
        data_root=".", clients=1000, rounds=10, batch_size=10, lr=0.1, seed=0, device="cpu",
        threads=1, eval_every=10, cohort=50,
    )  # fmt: skip
    config = load_config(None, bench_pfl.fedimb_config(args, "on"))
    assert config.model.name == "pfl-cnn" and config["batch-size"] == 10
    assert config.strategy_options["fraction-train"] * 1000 == 50
    row = bench_pfl.summarise("x", {"round_end": [0.0, 3.0, 4.0, 6.0], "accuracy": {}}, 9.0)
    assert row["first_round_s"] == 3.0 and row["round_s"] == 1.5 and row["rounds_total_s"] == 6.0
