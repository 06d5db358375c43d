"""On CUDA: the vectorised trainer gives the CPU result, and bf16 training stays finite."""

import numpy as np
import pytest
import torch

from fedimb.batched import train_clients
from fedimb.losses import make_loss
from fedimb.models import build_model
from fedimb.train import ClientJob, TrainSettings, client_rng, make_plan

pytestmark = pytest.mark.gpu


def _jobs(device, settings):
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for pid, n in enumerate([40, 33, 17]):
        y = torch.tensor([pid % 10, (pid + 3) % 10])[torch.randint(0, 2, (n,), generator=gen)]
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
        counts = np.bincount(y.numpy(), minlength=10)
        plan = make_plan(y.numpy(), settings, client_rng(0, 1, pid))
        jobs.append(ClientJob(x.to(device), y.to(device), make_loss("ldam-drw", counts), plan))
    return jobs


def _to_float(x):
    return x.float() / 255.0


@pytest.fixture
def full_fp32():
    """fp32 convolutions and matmuls without TF32, which cuDNN uses by default.

    With the defaults (TF32 convolutions: 10-bit mantissas) the weights after a few
    steps differed from the CPU's by up to 4e-3 on an H200, far above fp32 rounding.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(("bf16", "autotune"), [(False, False), (True, False), (True, True)])
def test_cuda_vectorised_training_matches_cpu(bf16, autotune, full_fp32):
    torch.manual_seed(0)
    model = build_model("cnn", (3, 32, 32), 10, cosine_head=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(
        batch_size=8, lr=0.05, momentum=0.9, augment=True, bf16=bf16, cudnn_benchmark=autotune
    )
    cpu = train_clients(model, state, _jobs("cpu", settings), _to_float, settings)
    gpu = train_clients(model.cuda(), state, _jobs("cuda", settings), _to_float, settings)
    tol = 5e-2 if bf16 else 1e-3
    for a, b in zip(cpu, gpu, strict=True):
        assert np.isfinite(b.loss) and b.finite
        for key in a.state:
            torch.testing.assert_close(b.state[key].cpu(), a.state[key], rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_inprocess_run_matches_the_cpu_run(tmp_path, precision):
    """The whole fast path on CUDA (vectorised clients, replies from pinned host memory,
    stock FedAvg) learns what the CPU run learns."""
    pytest.importorskip("flwr")
    from fedimb.config import load_config
    from fedimb.results import read_jsonl
    from fedimb.sim import run_experiment

    errors = {}
    for device in ("cpu", "cuda"):
        config = load_config(
            overrides={
                "num-clients": 10,
                "num-rounds": 3,
                "engine": "inprocess",
                "batched": "on",
                "device": device,
                "precision": precision if device == "cuda" else "fp32",
                "strategy.min-train-clients": 10,
            }
        )
        out = tmp_path / device
        run_experiment(config, out, progress=False)
        errors[device] = [r["balanced_error"] for r in read_jsonl(out / "metrics.jsonl")]
    assert errors["cuda"][0] == pytest.approx(errors["cpu"][0], abs=1e-6)  # same start
    assert errors["cuda"][-1] < 0.75  # it learned (chance: 0.9)
    tol = 0.05 if precision == "bf16" else 0.02
    assert errors["cuda"][-1] == pytest.approx(errors["cpu"][-1], abs=tol)
