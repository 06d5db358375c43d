"""fedimb beside pfl-research on pfl's CIFAR-10 benchmark workload, each in its own process.

pfl-research's ``benchmarks/image_classification`` baseline: CIFAR-10 split IID into
1,000 users of 50 images, 50 users sampled per central iteration, 1 local epoch at
batch 10 with SGD (local lr 0.1), FedAvg (central SGD at lr 1 on the mean update), their
small CNN (``pfl-cnn`` here), central evaluation on the 10,000 test images every 10
iterations.
Both sides get the same data (decoded once by fedimb, handed to pfl as
arrays normalised as fedimb normalises them), the same partition, the same cohorts
(pfl's user sampler replays the clients fedimb's FedAvg sampled), the same initial
weights (``pfl-cnn`` built under the same seed) and the same hyperparameters.
Reported per side: seconds per round (mean and median over rounds 2..R; round 1
includes first-call costs), the time for R rounds, and the test accuracy at each
evaluated round. The accuracies agree in distribution, not bit for bit: dropout masks
and batch orders are each framework's own.

pfl needs its own environment (``pfl==0.6.0`` pins numpy/scipy ranges that fedimb's
need not share): ``--pfl-python`` is that environment's interpreter. Example::

    python benchmarks/bench_pfl.py --rounds 10 --device cpu --threads 1 \\
        --pfl-python /work/pflvenv/bin/python --out benchmarks/results/cpu-pfl.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CIFAR_ROOT = REPO.parent / "shared" / "data" / "cifar10-jpeg"


def fedimb_config(args: argparse.Namespace, batched: str) -> dict[str, Any]:
    """The workload as fedimb config overrides."""
    return {
        "dataset": "imagefolder",
        "data-root": str(Path(args.data_root).resolve()),
        "num-clients": args.clients,
        "num-rounds": args.rounds,
        "local-epochs": 1,
        "batch-size": args.batch_size,
        "lr": args.lr,
        "momentum": 0.0,
        "seed": args.seed,
        "engine": "inprocess",
        "device": args.device,
        "batched": batched,
        "augment": "off",
        "threads": args.threads,
        "eval-every": args.eval_every,
        "eval-batch-size": 10000,
        "checkpoint-every": 0,
        "partition.name": "iid",
        "loss.name": "ce",
        "model.name": "pfl-cnn",
        "strategy.name": "fedavg",
        "strategy.fraction-train": args.cohort / args.clients,
        "strategy.min-train-clients": args.cohort,
    }


def run_fedimb(args: argparse.Namespace, batched: str, out_dir: Path) -> dict[str, Any]:
    """fedimb's run (in this process: the worker); writes the arrays pfl needs."""
    import numpy as np
    import torch

    from fedimb.config import load_config
    from fedimb.federation import get_federation
    from fedimb.results import read_jsonl
    from fedimb.sim import run_experiment

    torch.set_num_threads(args.threads)
    config = load_config(None, fedimb_config(args, batched))
    fed = get_federation(config)
    ends: list[float] = []
    t0 = time.perf_counter()
    run_experiment(
        config,
        out_dir / "run",
        progress=False,
        on_round=lambda r, row: ends.append(time.perf_counter()),
    )
    total = time.perf_counter() - t0
    rows = read_jsonl(out_dir / "run" / "metrics.jsonl")
    clients = read_jsonl(out_dir / "run" / "clients.jsonl")
    cohorts: dict[int, list[int]] = {}
    for row in clients:
        cohorts.setdefault(int(row["round"]), []).append(int(row["partition-id"]))
    data = fed.dataset
    np.savez(
        out_dir / "workload.npz",
        x_train=data.x_train.numpy(),
        y_train=data.y_train.numpy(),
        x_test=data.x_test.numpy(),
        y_test=data.y_test.numpy(),
        mean=np.array(data.mean),
        std=np.array(data.std),
        max_value=np.array(data.max_value),
        parts=np.concatenate(fed.parts),
        part_sizes=np.array([len(p) for p in fed.parts]),
        cohorts=np.array([sorted(cohorts[r]) for r in sorted(cohorts)]),
    )
    accuracy = {int(r["round"]): r["accuracy"] for r in rows if r.get("accuracy") is not None}
    return {"round_end": ends, "accuracy": accuracy, "total_s": total}


def run_pfl(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """pfl's run (in the pfl environment: the worker), on fedimb's arrays and cohorts."""
    import types

    import numpy as np
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    sys.path.insert(0, str(REPO))
    from fedimb.models import build_model

    torch.set_num_threads(args.threads)
    w = np.load(out_dir / "workload.npz")
    shape = (1, len(w["mean"]), 1, 1)
    mean, std = w["mean"].reshape(shape), w["std"].reshape(shape)

    def normalised(x: np.ndarray) -> np.ndarray:  # as fedimb's Dataset.to_float
        return ((x.astype(np.float32) / w["max_value"] - mean) / std).astype(np.float32)

    x_train, y_train = normalised(w["x_train"]), w["y_train"].astype(np.int64)
    bounds = np.cumsum(w["part_sizes"])[:-1]
    users = {
        uid: (x_train[idx], y_train[idx]) for uid, idx in enumerate(np.split(w["parts"], bounds))
    }
    replay = iter(int(u) for cohort in w["cohorts"] for u in cohort)
    training = FederatedDataset.from_slices(users, lambda: next(replay))

    torch.manual_seed(args.seed)  # the initial weights fedimb's init_model draws
    net = build_model("pfl-cnn", tuple(w["x_train"].shape[1:]), 10)

    def loss(self, inputs, targets, eval=False):
        self.eval() if eval else self.train()
        return F.cross_entropy(self(inputs), targets.long())

    @torch.no_grad()
    def metrics(self, inputs, targets, eval=True):
        self.eval() if eval else self.train()
        logits = self(inputs)
        n = len(inputs)
        return {
            "loss": Weighted(F.cross_entropy(logits, targets.long(), reduction="sum").item(), n),
            "accuracy": Weighted((logits.argmax(-1) == targets).float().sum().item(), n),
        }

    net.loss = types.MethodType(loss, net)
    net.metrics = types.MethodType(metrics, net)
    params = [p for p in net.parameters() if p.requires_grad]
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(params, args.pfl_central_lr),
    )
    ends: list[float] = []
    accuracy: dict[int, float] = {}

    x_test = torch.as_tensor(normalised(w["x_test"]))
    y_test = torch.as_tensor(w["y_test"].astype(np.int64))

    @torch.no_grad()
    def test_accuracy() -> float:  # as fedimb's evaluation: the whole test split
        device = next(net.parameters()).device
        net.eval()
        correct = sum(
            int((net(x.to(device)).argmax(1).cpu() == y).sum())
            for x, y in zip(x_test.split(10000), y_test.split(10000), strict=True)
        )
        return correct / len(y_test)

    class Evaluate(TrainingProcessCallback):
        """The test accuracy after the rounds fedimb evaluates (every ``eval_every``
        and the last), then the round's end stamp."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            done = central_iteration + 1  # rounds completed
            if done % args.eval_every == 0 or done == args.rounds:
                accuracy[done] = test_accuracy()
            ends.append(time.perf_counter())
            return False, Metrics()

    accuracy[0] = test_accuracy()
    backend = SimulatedBackend(
        training_data=training, val_data=None, postprocessors=[WeightByUser()]
    )
    t0 = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds,
            evaluation_frequency=args.eval_every,
            train_cohort_size=args.cohort,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=args.lr, local_num_epochs=1, local_batch_size=args.batch_size
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=10000),
        callbacks=[Evaluate()],
    )
    total = time.perf_counter() - t0
    return {"round_end": [t0, *ends], "accuracy": accuracy, "total_s": total}


def summarise(name: str, raw: dict[str, Any], wall: float) -> dict[str, Any]:
    """Per-round seconds (rounds 2..R), time for R rounds and accuracies of one side."""
    ends = raw["round_end"]
    durations = [b - a for a, b in itertools.pairwise(ends)]
    steady = durations[1:] or durations
    return {
        "side": name,
        "rounds": len(durations),
        "first_round_s": round(durations[0], 3),
        "round_s": round(sum(steady) / len(steady), 4),
        "round_s_median": round(statistics.median(steady), 4),
        "rounds_total_s": round(ends[-1] - ends[0], 2),
        "process_s": round(wall, 1),
        "accuracy": raw["accuracy"],
    }


def _worker(args: argparse.Namespace) -> int:
    out_dir = Path(args.work_dir)
    if args.worker == "pfl":
        raw = run_pfl(args, out_dir)
    else:
        raw = run_fedimb(args, args.worker.removeprefix("fedimb-"), out_dir)
    (out_dir / f"{args.worker}.json").write_text(json.dumps(raw))
    return 0


def _spawn(python: str, side: str, argv: list[str], work: Path, timeout: float) -> dict:
    cmd = [python, str(Path(__file__).resolve()), *argv, "--worker", side, "--work-dir", str(work)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"side": side, "error": f"exit code {proc.returncode}", "log_tail": tail}
    return summarise(side, json.loads((work / f"{side}.json").read_text()), wall)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--cohort", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=str(DEFAULT_CIFAR_ROOT))
    p.add_argument(
        "--fedimb-batched",
        default="off",
        help="comma-separated batched settings for fedimb's runs (off: one client at a time)",
    )
    p.add_argument("--pfl-python", default=None, help="interpreter of pfl's environment")
    p.add_argument(
        "--pfl-central-lr",
        type=float,
        default=1.0,
        help="pfl's central SGD lr (1, as pfl's benchmark: the step is the mean update)",
    )
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out"]
    if args.out:
        passed = [a for a in passed if a != str(args.out)]
    rows: list[dict[str, Any]] = []

    def save() -> None:  # after each side: a run cut short keeps what it measured
        ok = [r for r in rows if "error" not in r]
        pfl = next((r for r in ok if r["side"] == "pfl"), None)
        for r in ok:
            if pfl is not None and r is not pfl:
                r["pfl_round_over_this"] = round(pfl["round_s"] / r["round_s"], 2)
        report = {"command": " ".join(sys.argv), "workload": vars(args), "results": rows}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-pfl-") as tmp:
        work = Path(tmp)
        # fedimb first: it writes the arrays and the cohorts pfl replays.
        for batched in args.fedimb_batched.split(","):
            rows.append(_spawn(sys.executable, f"fedimb-{batched}", passed, work, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
            save()
        if args.pfl_python and (work / "workload.npz").exists():
            rows.append(_spawn(args.pfl_python, "pfl", passed, work, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
            save()
        elif not args.pfl_python:
            print("note: no --pfl-python: pfl not run")
    ok = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            print(f"{r['side']}: FAILED {r['error']}\n{r['log_tail']}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
