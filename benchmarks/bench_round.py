"""Speed of a federated round: fedimb's fast path against stock Flower and against the limits.

One command measures, on the same data partition, model and hyperparameters:

``fedimb``   fedimb's fast path: ``fedimb.sim.run_experiment`` on the in-process engine,
             a round's clients trained as one vectorised step (``batched = "on"``).
``flower``   a stock Flower 1.42 app in the style of Flower's PyTorch quickstart: a
             Message-API ClientApp written here (``DataLoader`` + ``torch.optim.SGD``),
             stock ``FedAvg``, ``flwr.simulation.run_simulation`` on Ray with one client
             per actor (``num_cpus = 1``).
``loop``     stock training without Flower: one client at a time with a ``DataLoader`` in
             one process, then FedAvg. A lower bound on the stock Flower round.
``vmap``     the vectorised limit: ``fedimb.batched.train_clients`` on all clients' jobs,
             no Flower. Without flwr installed it stands for fedimb's fast path.
``bigbatch`` the big-batch limit: one model, batch 512, data on the device, as many
             images per round as all clients together.
``limit``    the vectorised step's ceiling: the same model, clients and batch, synthetic
             data already on the device, one ``vmap`` gradient and SGD update per step,
             no Flower, plans, padding or evaluation; ``round_vs_step_limit`` in the
             ratios is fedimb's round over this one, measured in the same run.

Every setting runs in a fresh subprocess, so each pays its own imports and start-up and
its memory is its own. A round's end is stamped when the server has the new global
model (for Flower runs: when Flower calls ``evaluate_fn``). Reported per setting:
start-up (process launch to the end of round 1), steady seconds per round (mean over
rounds 2..R), images/s at the steady rate, peak host memory (the process, and the sum
over the process and all its descendants, e.g. Ray's workers) and peak GPU memory.

Examples
--------
CPU (digits, 100 clients x 2 classes, MLP, 10 rounds; both torch thread settings)::

    python benchmarks/bench_round.py --device cpu --threads both \\
        --out benchmarks/results/cpu-digits.json

GPU (CIFAR-10 image folder, 2-conv CNN and ResNet-32 with GroupNorm)::

    python benchmarks/bench_round.py --device cuda --model cnn,resnet32 \\
        --data-root ../shared/data/cifar10-jpeg --out benchmarks/results/gpu-cifar10.json

Host memory of 1,000 simulated clients on CIFAR-10 (one round, groups of 100)::

    python benchmarks/bench_round.py --memory-1000 --device cpu

A setting whose libraries are missing is skipped with a note: ``flower`` needs flwr and
Ray, ``fedimb`` flwr alone (its in-process engine never imports Ray), and ``loop``,
``vmap`` and ``bigbatch`` only torch and numpy. Those three build the partition with
fedimb's data modules directly, not through ``fedimb.config`` (validating a config
imports ``strategies``, hence flwr); the script reports which fedimb modules, if any,
import flwr or ray. Without Ray, ``loop`` stands for the stock baseline (a lower bound
on stock Flower's round); without flwr, ``vmap`` stands for fedimb.

Every setting evaluates the global model on the test split at round 0 and after the
last round, inside the timed rounds, as fedimb's server does with ``eval-every = R``.
No setting augments data (the stock baseline would do it per sample on the host).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedimb.results import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CIFAR_ROOT = REPO.parent / "shared" / "data" / "cifar10-jpeg"
NEEDS = {"fedimb": ("flwr",), "memory": ("flwr",), "flower": ("flwr", "ray")}
"""The settings that need more than torch and numpy, and what they import."""
ALL_SETTINGS = ("fedimb", "flower", "loop", "vmap", "bigbatch", "limit")
MEMORY_SETTINGS = ("memory", "memory-hold", "memory-stream")
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every setting trains: the same data, partition, model and hyperparameters.

    Attributes
    ----------
    dataset : str
        ``"digits"`` (bundled) or ``"cifar10"`` (an image-folder tree at ``data_root``).
    model : str
        A fedimb model name (``mlp``, ``cnn``, ``resnet32``).
    device : str
        ``"cpu"`` or ``"cuda"``.
    threads : str
        ``"default"`` (torch's own choice) or ``"1"`` (``torch.set_num_threads(1)``).
    group_size : int
        Clients per vectorised step (0 = all clients of the round at once).
    precision : str
        ``"fp32"`` or ``"bf16"`` (autocast) for ``fedimb``, ``vmap`` and ``bigbatch``;
        the stock settings (``flower``, ``loop``) train in fp32, as the quickstart does.
    cudnn_benchmark : bool
        cuDNN autotuning for ``fedimb``, ``vmap`` and ``bigbatch`` (fedimb's
        ``cudnn-benchmark`` key); the stock settings keep PyTorch's default (off).
    stock_data : str
        How the stock settings feed their ``DataLoader``: ``"tensors"`` (each client's
        samples normalised once, a lower bound) or ``"quickstart"`` (PIL images, each
        turned into a tensor and normalised when loaded, as Flower's PyTorch quickstart
        does per batch).
    """

    dataset: str = "digits"
    data_root: str = ""
    model: str = "mlp"
    device: str = "cpu"
    clients: int = 100
    rounds: int = 10
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    classes_per_client: int = 2
    big_batch: int = 512
    threads: str = "default"
    group_size: int = 0
    precision: str = "fp32"
    cudnn_benchmark: bool = False
    stock_data: str = "tensors"

    def source(self) -> tuple[str, str | None]:
        """fedimb's dataset name and root for this workload."""
        if self.dataset == "digits":
            return "digits", None
        return "imagefolder", self.data_root


# --------------------------------------------------------------------------- measuring


def _proc_children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # The command name may hold spaces: fields after ')' are fixed.
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's GCS, raylet and worker processes)."""
    children, out, todo = _proc_children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS splits shared pages among their users."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class PeakMemory:
    """Peak host memory of this process and of its whole process tree.

    The process's own peak is exact (``getrusage``); the tree's is sampled every
    ``interval`` seconds from /proc (Linux only), as RSS (shared pages counted once per
    process: an upper bound) and PSS (shared pages split: the fair sum).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.tree_rss_kib = self.tree_pss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.enabled = os.path.isdir("/proc")

    def sample(self) -> None:
        """Add one sample of the tree's memory."""
        if not self.enabled:
            return
        rss = pss = 0
        for pid in _tree_pids(os.getpid()):
            r, p = _memory_kib(pid)
            rss, pss = rss + r, pss + p
        self.tree_rss_kib = max(self.tree_rss_kib, rss)
        self.tree_pss_kib = max(self.tree_pss_kib, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict[str, float | None]:
        """Peaks in MiB (``None`` where /proc is not available)."""
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        tree = self.enabled and self.tree_rss_kib > 0
        return {
            "peak_rss_mib": round(own, 1),
            "peak_tree_rss_mib": round(self.tree_rss_kib / 1024, 1) if tree else None,
            "peak_tree_pss_mib": round(self.tree_pss_kib / 1024, 1) if tree else None,
        }


def stamp(device: Any) -> float:
    """Wall-clock time after the device's queued work has finished (None: host only)."""
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def partition_digest(parts: Sequence[Any]) -> str:
    """A short hash of a partition (client i's sample indices, in order)."""
    import numpy as np

    h = hashlib.sha256()
    for p in parts:
        arr = np.asarray(p, dtype=np.int64)
        h.update(np.int64(arr.size).tobytes() + arr.tobytes())
    return h.hexdigest()[:16]


def apply_threads(w: Workload) -> None:
    """Use one torch thread when asked (small models on a busy CPU are faster that way)."""
    import torch

    if w.threads == "1":
        torch.set_num_threads(1)


# ------------------------------------------------------------------ data, model, FedAvg


def load_federation(w: Workload, device: str) -> Any:
    """The workload's dataset and label-skew partition, as fedimb builds it (no Flower).

    Mirrors ``fedimb.federation.build_federation`` (no global long tail): the same
    loader, partitioner and seeded generator, so every setting trains the same clients;
    the fedimb worker checks this by comparing partition digests.
    """
    import numpy as np
    import torch

    from fedimb.data import datasets
    from fedimb.data.partition import class_counts, partition
    from fedimb.federation import Federation, seeded_rng

    name, root = w.source()
    data = datasets.load_dataset(name, root)
    labels = data.y_train.numpy()
    parts = partition(
        "label-skew",
        labels,
        w.clients,
        seeded_rng(w.seed, 2),
        classes_per_client=w.classes_per_client,
    )
    counts = class_counts(labels, parts, data.num_classes)
    return Federation(data, np.arange(len(labels)), parts, counts, torch.device(device))


def make_model(w: Workload, fed: Any) -> Any:
    """The workload's model with fedimb's seeded initial weights (on CPU)."""
    import torch

    from fedimb.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(w.seed)
        return build_model(w.model, fed.dataset.input_shape, fed.num_classes)


def images_per_round(w: Workload, fed: Any) -> int:
    """Images trained in one round by all clients together."""
    return w.epochs * sum(len(p) for p in fed.parts)


def fedavg(states: Sequence[dict[str, Any]], weights: Sequence[int]) -> dict[str, Any]:
    """The ``weights``-weighted mean of state dicts (FedAvg), on the states' device."""
    total = float(sum(weights))
    return {
        name: sum(s[name].float() * (n / total) for s, n in zip(states, weights, strict=True))
        for name in states[0]
    }


def evaluate_model(model: Any, fed: Any, device: Any) -> dict[str, float]:
    """Accuracy and balanced error (mean per-class error) on the test split."""
    import numpy as np

    from fedimb.train import evaluate_counts

    x, y = fed.dataset.x_test.to(device), fed.dataset.y_test.to(device)
    correct, total = evaluate_counts(model, x, y, fed.num_classes, fed.dataset.to_float)
    seen = total > 0
    return {
        "accuracy": round(float(correct.sum() / total.sum()), 4),
        "balanced_error": round(float(np.mean(1 - correct[seen] / total[seen])), 4),
    }


def stock_local_train(model: Any, loader: Any, epochs: int, lr: float, device: Any) -> float:
    """The quickstart's ``train``: SGD over a DataLoader, mean loss of the steps."""
    import torch

    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    running, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running += loss.item()
            steps += 1
    return running / max(steps, 1)


def stock_client_dataset(fed: Any, pid: int, stock_data: str = "tensors") -> Any:
    """Client ``pid``'s samples for a stock ``DataLoader``, on the CPU.

    ``"tensors"``: a ``TensorDataset`` normalised once (kinder to the baseline than the
    quickstart). ``"quickstart"``: :class:`QuickstartImages`.
    """
    import torch

    idx = torch.as_tensor(fed.parts[pid])
    if stock_data == "quickstart":
        return QuickstartImages(fed.dataset, idx)
    x = fed.dataset.to_float(fed.dataset.x_train[idx])
    return torch.utils.data.TensorDataset(x, fed.dataset.y_train[idx])


class QuickstartImages:
    """Samples as PIL images, each made a tensor and normalised when it is loaded.

    What Flower's PyTorch quickstart does per batch (``Compose([ToTensor(),
    Normalize(...)])`` in ``with_transform``), with the images decoded once (the
    quickstart's Hugging Face dataset decodes them on every access). The ``Normalize``
    constants are rescaled so that the tensors equal ``Dataset.to_float``'s for any
    ``max_value`` (``ToTensor`` divides 8-bit images by 255).
    """

    def __init__(self, dataset: Any, idx: Any) -> None:
        from PIL import Image
        from torchvision.transforms import Compose, Normalize, ToTensor

        channels_last = dataset.x_train[idx].permute(0, 2, 3, 1).numpy()
        if channels_last.shape[-1] == 1:
            channels_last = channels_last[..., 0]
        self.images = [Image.fromarray(img) for img in channels_last]
        self.labels = dataset.y_train[idx]
        scale = dataset.max_value / 255
        self.transform = Compose(
            [
                ToTensor(),
                Normalize([m * scale for m in dataset.mean], [s * scale for s in dataset.std]),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.transform(self.images[i]), self.labels[i]


# ----------------------------------------------------------------------- the settings


def fedimb_overrides(w: Workload) -> dict[str, Any]:
    """The fedimb config of the workload: in-process engine, batched, no augmentation."""
    import torch

    name, root = w.source()
    return {
        "dataset": name,
        "data-root": root or "",
        "num-clients": w.clients,
        "num-rounds": w.rounds,
        "local-epochs": w.epochs,
        "batch-size": w.batch_size,
        "lr": w.lr,
        "momentum": 0.0,
        "seed": w.seed,
        "engine": "inprocess",
        "device": w.device,
        "batched": "on",
        "group-size": w.group_size,
        "augment": "off",  # the stock baseline does not augment either
        "precision": w.precision,
        "cudnn-benchmark": w.cudnn_benchmark,
        "threads": torch.get_num_threads(),  # as apply_threads left it, like the others
        "eval-every": w.rounds,  # evaluate at round 0 and the last round, as the others do
        "checkpoint-every": 0,
        "partition.name": "label-skew",
        "partition.classes-per-client": w.classes_per_client,
        "loss.name": "ce",
        "strategy.name": "fedavg",
        "strategy.fraction-train": 1.0,
        "strategy.min-train-clients": w.clients,
        "model.name": w.model,
    }


def run_fedimb(w: Workload) -> dict[str, Any]:
    """fedimb's fast path, launched as users launch it (``run_experiment``)."""
    from fedimb.config import load_config
    from fedimb.federation import get_federation
    from fedimb.sim import run_experiment

    apply_threads(w)
    config = load_config(None, fedimb_overrides(w))
    stamps: list[float] = []
    rows: list[dict[str, Any]] = []

    def on_round(server_round: int, row: dict[str, Any]) -> None:
        stamps.append(time.time())
        rows.append(row)

    with tempfile.TemporaryDirectory(prefix="bench-fedimb-") as out:
        run_experiment(config, out, progress=False, on_round=on_round)
    fed = get_federation(config)
    last = rows[-1]
    return {
        "round_end": stamps,
        "images_per_round": images_per_round(w, fed),
        "partition": partition_digest(fed.parts),
        "accuracy": last.get("accuracy"),
        "balanced_error": last.get("balanced_error"),
        "device": str(fed.device),
    }


_STOCK_CACHE: dict[str, Any] = {}
"""Per-process cache of the stock client (a Ray actor keeps it across messages, as the
quickstart keeps its FederatedDataset)."""


def stock_train(msg: Any, context: Any) -> Any:
    """The stock ClientApp's ``@app.train()``: quickstart-style local training.

    Loads the global arrays into a fresh model, trains one client's partition with a
    ``DataLoader`` and SGD, and replies with the new arrays and ``num-examples``.
    Defined at module level so Ray pickles it by reference and its cache lives on in
    each actor.
    """
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    cfg = msg.content["config"]
    w = Workload(**json.loads(str(cfg["workload"])))
    apply_threads(w)
    if "fed" not in _STOCK_CACHE:
        _STOCK_CACHE["fed"] = load_federation(w, "cpu")
    fed = _STOCK_CACHE["fed"]
    pid = int(context.node_config["partition-id"])
    if pid not in _STOCK_CACHE:
        _STOCK_CACHE[pid] = stock_client_dataset(fed, pid, w.stock_data)
    dataset = _STOCK_CACHE[pid]

    device = torch.device(w.device)
    model = make_model(w, fed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=w.batch_size, shuffle=True)
    loss = stock_local_train(model, loader, w.epochs, float(cfg["lr"]), device)
    metrics: dict[str, float | int] = {
        "train_loss": loss,
        "num-examples": len(dataset) * w.epochs,
        "torch-threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        metrics["cuda-peak-mib"] = torch.cuda.max_memory_allocated(device) / MIB
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


def sum_or_max_metrics(records: list[Any], weighting_key: str) -> Any:
    """Train-metric aggregation for the benchmark's bookkeeping: sums ``num-examples``
    (images trained in the round), keeps the maximum of everything else."""
    from flwr.app import MetricRecord

    out: dict[str, float | int] = {}
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if key == weighting_key:
                    out[key] = out.get(key, 0) + value
                else:
                    out[key] = max(out.get(key, value), value)
    return MetricRecord(out)


def run_flower(w: Workload) -> dict[str, Any]:
    """Stock Flower: quickstart-style ClientApp, FedAvg, ``run_simulation`` on Ray."""
    import logging

    import ray
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    apply_threads(w)
    device = torch.device(w.device)
    fed = load_federation(w, "cpu")
    model = make_model(w, fed).to(device)
    stamps: list[float] = []
    final: dict[str, Any] = {}
    train_metrics: list[dict[str, Any]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round in (0, w.rounds):
            model.load_state_dict(arrays.to_torch_state_dict())
            final.update(evaluate_model(model, fed, device))
        stamps.append(time.time())
        return MetricRecord({k: v for k, v in final.items()})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=w.clients,
            min_available_nodes=w.clients,
            train_metrics_aggr_fn=sum_or_max_metrics,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=w.rounds,
            train_config=ConfigRecord({"lr": w.lr, "workload": json.dumps(dataclasses.asdict(w))}),
            evaluate_fn=evaluate,
        )
        train_metrics.extend(dict(m) for m in result.train_metrics_clientapp.values())

    client_app = ClientApp()
    client_app.train()(stock_train)
    # One client per actor (num_cpus = 1); on a GPU the actors share it evenly.
    gpus = 1.0 / (os.cpu_count() or 1) if device.type == "cuda" else 0.0
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=w.clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": gpus},
                "init_args": {"include_dashboard": False, "log_to_driver": False},
            },
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if len(stamps) != w.rounds + 1:
        raise RuntimeError(f"the Flower run ended after {len(stamps) - 1} of {w.rounds} rounds")
    trained = [int(m.get("num-examples", 0)) for m in train_metrics]
    if any(n != images_per_round(w, fed) for n in trained):
        raise RuntimeError(f"images trained per round {trained} != {images_per_round(w, fed)}")
    out = {
        "round_end": stamps,
        "images_per_round": images_per_round(w, fed),
        "images_trained_per_round": trained,
        "partition": partition_digest(fed.parts),
        "actor_torch_threads": max((m.get("torch-threads", 0) for m in train_metrics), default=0),
        "actors": int(os.cpu_count() or 1) if device.type == "cuda" else None,
        **final,
    }
    peaks = [m["cuda-peak-mib"] for m in train_metrics if "cuda-peak-mib" in m]
    if peaks:
        out["peak_gpu_mib_per_actor"] = round(max(peaks), 1)
    return out


def timed_result(w: Workload, fed: Any, stamps: list[Any], final: dict[str, Any]) -> dict[str, Any]:
    """What every timed setting reports: round end stamps, work done, partition, accuracy."""
    return {
        "round_end": stamps,
        "images_per_round": images_per_round(w, fed),
        "partition": partition_digest(fed.parts),
        **final,
    }


def run_loop(w: Workload) -> dict[str, Any]:
    """Stock training without Flower: one client at a time, DataLoader, then FedAvg."""
    import torch

    apply_threads(w)
    device = torch.device(w.device)
    fed = load_federation(w, "cpu")
    model = make_model(w, fed).to(device)
    datasets = [stock_client_dataset(fed, pid, w.stock_data) for pid in range(w.clients)]
    final = evaluate_model(model, fed, device)
    stamps = [stamp(device)]
    for server_round in range(1, w.rounds + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        states, weights = [], []
        for dataset in datasets:
            model.load_state_dict(global_state)
            loader = torch.utils.data.DataLoader(dataset, batch_size=w.batch_size, shuffle=True)
            stock_local_train(model, loader, w.epochs, w.lr, device)
            states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            weights.append(len(dataset))
        model.load_state_dict(fedavg(states, weights))
        if server_round == w.rounds:
            final = evaluate_model(model, fed, device)
        stamps.append(stamp(device))
    return timed_result(w, fed, stamps, final)


def client_jobs(w: Workload, fed: Any, server_round: int, settings: Any) -> list[Any]:
    """Every client's job for one round, built as ``fedimb.client.build_job`` builds it
    for the workload (cross-entropy, instance sampling), without importing flwr."""
    from fedimb.losses import make_loss
    from fedimb.train import ClientJob, client_rng, make_plan

    jobs = []
    for pid in range(w.clients):
        x, y = fed.client_tensors(pid)
        loss = make_loss("ce", fed.counts[pid], server_round=server_round, num_rounds=w.rounds)
        plan = make_plan(
            fed.client_labels(pid),
            settings,
            client_rng(w.seed, server_round, pid),
            server_round=server_round,
            num_rounds=w.rounds,
        )
        jobs.append(ClientJob(x=x, y=y, loss=loss, plan=plan))
    return jobs


def run_vmap(w: Workload) -> dict[str, Any]:
    """The vectorised limit: ``fedimb.batched.train_clients`` on all jobs, then FedAvg."""
    import torch

    from fedimb.batched import train_clients
    from fedimb.train import TrainSettings

    apply_threads(w)
    device = torch.device(w.device)
    fed = load_federation(w, w.device)
    model = make_model(w, fed).to(device)
    settings = TrainSettings(
        epochs=w.epochs,
        batch_size=w.batch_size,
        lr=w.lr,
        bf16=w.precision == "bf16",
        cudnn_benchmark=w.cudnn_benchmark,
    )
    for pid in range(w.clients):
        fed.client_tensors(pid)  # data resident on the device before round 1, as in fedimb
    final = evaluate_model(model, fed, device)
    stamps = [stamp(device)]
    size = w.group_size or w.clients
    to_float = fed.dataset.to_float
    for server_round in range(1, w.rounds + 1):
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        jobs = client_jobs(w, fed, server_round, settings)
        results = []
        for start in range(0, len(jobs), size):
            results += train_clients(
                model, global_state, jobs[start : start + size], to_float, settings
            )
        model.load_state_dict(fedavg([r.state for r in results], [r.num_examples for r in results]))
        if server_round == w.rounds:
            final = evaluate_model(model, fed, device)
        stamps.append(stamp(device))
    return timed_result(w, fed, stamps, final)


def run_limit(w: Workload) -> dict[str, Any]:
    """The vectorised step's ceiling: the same model, clients and batch as ``vmap``, on
    synthetic data already on the device, every client the same number of full steps
    (as many images per round as the workload), no plans, padding, losses per client,
    replies or evaluation: one ``vmap`` of ``grad`` and a ``_foreach`` SGD update per step.
    """
    import math

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad_and_value, vmap

    from fedimb.models import reads_tokens
    from fedimb.train import autocast, cudnn_autotuning

    apply_threads(w)
    device = torch.device(w.device)
    fed = load_federation(w, "cpu")  # for the partition digest and images per round
    model = make_model(w, fed).to(device)
    k = w.group_size or w.clients
    steps = math.ceil(images_per_round(w, fed) / (k * w.batch_size))
    gen = torch.Generator(device=device).manual_seed(w.seed)
    shape = (k, w.batch_size, *fed.dataset.input_shape)
    pool = 4  # distinct synthetic batches, cycled (the data stays on the device)
    if not reads_tokens(w.model):  # standing for normalised images or features
        xs = [torch.randn(shape, generator=gen, device=device) for _ in range(pool)]
    else:
        high = int(fed.dataset.x_train.max()) + 1
        xs = [torch.randint(0, high, shape, generator=gen, device=device) for _ in range(pool)]
    ys = [
        torch.randint(0, fed.num_classes, shape[:2], generator=gen, device=device)
        for _ in range(pool)
    ]
    names = [n for n, _ in model.named_parameters()]
    bf16 = w.precision == "bf16"

    def client_loss(p, b, x, y):
        with autocast(device, bf16):
            logits = functional_call(model, (p, b), (x,))
        return F.cross_entropy(logits.float(), y)

    step = vmap(grad_and_value(client_loss))
    state = {n: v.detach() for n, v in model.state_dict().items()}
    stamps = [stamp(device)]
    for _ in range(w.rounds):
        params = {n: state[n].expand(k, *state[n].shape).clone() for n in names}
        bufs = {n: v.expand(k, *v.shape).clone() for n, v in state.items() if n not in params}
        with cudnn_autotuning(w.cudnn_benchmark):
            for t in range(steps):
                grads, _ = step(params, bufs, xs[t % pool], ys[t % pool])
                with torch.no_grad():
                    torch._foreach_add_(
                        [params[n] for n in names], [grads[n] for n in names], alpha=-w.lr
                    )
        with torch.no_grad():  # the unweighted mean stands for FedAvg's
            state = {**state, **{n: params[n].mean(0) for n in names}}
        stamps.append(stamp(device))
    out = timed_result(w, fed, stamps, {})
    out["limit_steps_per_round"] = steps
    return out


def run_bigbatch(w: Workload) -> dict[str, Any]:
    """The big-batch limit: one model, batch ``big_batch``, all clients' images on the device."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fedimb.train import autocast, cudnn_autotuning

    apply_threads(w)
    device = torch.device(w.device)
    fed = load_federation(w, w.device)
    model = make_model(w, fed).to(device)
    idx = torch.as_tensor(np.concatenate(fed.parts))
    x, y = fed.dataset.x_train[idx].to(device), fed.dataset.y_train[idx].to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(w.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=w.lr)
    final = evaluate_model(model, fed, device)
    stamps = [stamp(device)]
    bf16 = w.precision == "bf16"
    for server_round in range(1, w.rounds + 1):
        model.train()
        with cudnn_autotuning(w.cudnn_benchmark):  # as fedimb's trainers: training only
            for _ in range(w.epochs):
                order = torch.randperm(len(y), generator=gen, device=device)
                for batch in order.split(w.big_batch):
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, bf16):
                        logits = model(fed.dataset.to_float(x[batch]))
                    loss = F.cross_entropy(logits.float(), y[batch])
                    loss.backward()
                    optimizer.step()
        if server_round == w.rounds:
            final = evaluate_model(model, fed, device)
        stamps.append(stamp(device))
    return timed_result(w, fed, stamps, final)


def run_memory(w: Workload) -> dict[str, Any]:
    """1,000 clients, fedimb as users run it: ``run_experiment`` on the in-process engine,
    every client's tensors resident, one round batched in groups of ``group_size``."""
    out = run_fedimb(w)
    out["path"] = "fedimb run_experiment (in-process engine)"
    return out


def _memory_core(w: Workload, hold: bool) -> dict[str, Any]:
    """Data, partition, every client's tensors and one batched round, without Flower.

    ``hold``: keep every client's trained weights (on the host) until all clients have
    trained, as a round's replies are kept until the strategy aggregates them; else add
    them to a running FedAvg sum (the least a round needs).
    """
    import torch

    from fedimb.batched import train_clients
    from fedimb.train import TrainSettings

    apply_threads(w)
    device = torch.device(w.device)
    fed = load_federation(w, w.device)
    model = make_model(w, fed).to(device)
    settings = TrainSettings(epochs=w.epochs, batch_size=w.batch_size, lr=w.lr)
    for pid in range(w.clients):
        fed.client_tensors(pid)
    stamps = [stamp(device)]
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    jobs = client_jobs(w, fed, 1, settings)
    to_float = fed.dataset.to_float
    held: list[dict[str, Any]] = []
    weights: list[int] = []
    total: dict[str, Any] = {}
    size = w.group_size or w.clients
    for start in range(0, len(jobs), size):
        group = jobs[start : start + size]
        for r in train_clients(model, global_state, group, to_float, settings):
            weights.append(r.num_examples)
            if hold:
                held.append({k: v.cpu() for k, v in r.state.items()})
            else:
                for k, v in r.state.items():
                    total[k] = total.get(k, 0) + v.float() * r.num_examples
    if hold:
        model.load_state_dict(fedavg(held, weights))
    else:
        model.load_state_dict({k: v / sum(weights) for k, v in total.items()})
    stamps.append(stamp(device))
    return {
        "round_end": stamps,
        "images_per_round": images_per_round(w, fed),
        "partition": partition_digest(fed.parts),
        "path": "train_clients in groups, no Flower, "
        + ("all clients' weights held until FedAvg" if hold else "running FedAvg sum"),
    }


def run_memory_hold(w: Workload) -> dict[str, Any]:
    """:func:`_memory_core`, holding every client's weights until FedAvg."""
    return _memory_core(w, hold=True)


def run_memory_stream(w: Workload) -> dict[str, Any]:
    """:func:`_memory_core`, with a running FedAvg sum."""
    return _memory_core(w, hold=False)


def run_prepare(w: Workload) -> dict[str, Any]:
    """Load (and cache) the dataset and import the libraries once, untimed, so that no
    timed setting pays for decoding images or a cold disk cache."""
    fed = load_federation(w, "cpu")
    for module in ("flwr.serverapp", "ray"):
        if importable(module.split(".")[0]):
            importlib.import_module(module)
    return {"images_per_round": images_per_round(w, fed), "partition": partition_digest(fed.parts)}


WORKERS: dict[str, Callable[[Workload], dict[str, Any]]] = {
    "fedimb": run_fedimb,
    "flower": run_flower,
    "loop": run_loop,
    "vmap": run_vmap,
    "bigbatch": run_bigbatch,
    "limit": run_limit,
    "memory": run_memory,
    "memory-hold": run_memory_hold,
    "memory-stream": run_memory_stream,
    "prepare": run_prepare,
}


def worker_main(setting: str, spec: str, result_path: str) -> int:
    """Run one setting in this (fresh) process and write its measurements as JSON."""
    import torch

    w = Workload(**json.loads(spec))
    if w.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        out = WORKERS[setting](w)
    out.update(mem.report())
    out["torch_threads"] = torch.get_num_threads()
    if w.device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    Path(result_path).write_text(json.dumps(out))
    return 0


# --------------------------------------------------------------------- orchestration


def importable(module: str) -> bool:
    """Whether ``module`` can be imported (``BENCH_WITHOUT=flwr,ray`` pretends not)."""
    if module in os.environ.get("BENCH_WITHOUT", "").split(","):
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def flower_free_imports() -> dict[str, list[str]]:
    """For each fedimb module the no-flwr path uses: the flwr/ray modules it imports."""
    modules = [
        "fedimb.batched",
        "fedimb.train",
        "fedimb.models",
        "fedimb.losses",
        "fedimb.data",
        "fedimb.federation",
    ]
    code = (
        "import importlib, json, sys\n"
        f"out = {{}}\nfor m in {modules!r}:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(m)\n"
        "    out[m] = sorted(k for k in set(sys.modules) - before\n"
        "                    if k.split('.')[0] in ('flwr', 'ray'))[:5]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": [proc.stderr.strip()[-500:]]}
    return json.loads(proc.stdout)


def run_worker(setting: str, w: Workload, log_dir: Path, timeout: float) -> dict[str, Any]:
    """Run one setting in a subprocess; add start-up and per-round times to its result."""
    tag = f"{setting}-{w.model}-t{w.threads}-{w.precision}"
    result_path, log_path = log_dir / f"{tag}.json", log_dir / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setting]
    cmd += ["--spec", json.dumps(dataclasses.asdict(w)), "--result", str(result_path)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    launched = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
    wall = time.time() - launched
    if code != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        return {
            "setting": setting,
            "model": w.model,
            "threads": w.threads,
            "error": f"exit code {code} after {wall:.0f}s",
            "log_tail": tail,
        }
    out = json.loads(result_path.read_text())
    out.update(setting=setting, model=w.model, threads=w.threads, total_s=round(wall, 2))
    ends = out.pop("round_end", [])
    if len(ends) >= 2:
        durations = [b - a for a, b in itertools.pairwise(ends)]
        steady = durations[1:] or durations
        out["startup_s"] = round(ends[1] - launched, 3)
        out["first_round_s"] = round(durations[0], 3)
        out["round_s"] = round(sum(steady) / len(steady), 4)
        out["round_s_min"] = round(min(steady), 4)
        out["round_s_median"] = round(statistics.median(steady), 4)
        out["round_s_all"] = [round(d, 4) for d in durations]
        out["images_per_s"] = round(out["images_per_round"] / out["round_s"], 1)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or None when either is missing."""
    return round(a / b, 2) if a and b else None


def _ratios(by: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speed ratios among one model's settings (``by``: setting -> result row).

    The fast path is ``fedimb`` (``vmap`` where flwr is missing); the stock baseline is
    ``flower`` (``loop``, its lower bound, where Ray is missing).
    """
    fast = "fedimb" if "fedimb" in by else "vmap"
    stock = "flower" if "flower" in by else "loop"
    f = by.get(fast, {})
    entry: dict[str, Any] = {"fast": fast, "stock": stock}
    for name in dict.fromkeys((stock, "loop")):
        s = by.get(name, {})
        entry[f"speedup_round_vs_{name}"] = ratio(s.get("round_s"), f.get("round_s"))
        entry[f"speedup_startup_vs_{name}"] = ratio(s.get("startup_s"), f.get("startup_s"))
    for limit in ("vmap", "bigbatch"):
        if limit != fast:
            entry[f"round_vs_{limit}_limit"] = ratio(
                f.get("round_s"), by.get(limit, {}).get("round_s")
            )
    entry["round_vs_step_limit"] = ratio(f.get("round_s"), by.get("limit", {}).get("round_s"))
    return entry


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed ratios per model and thread setting, and ("best") between each setting's
    fastest thread setting: fast vs stock (> 1: fast is faster) and fast vs the limits
    (> 1: fast is slower than the limit by that factor)."""
    good = [r for r in rows if "round_s" in r]
    out = []
    for model in sorted({r["model"] for r in good}):
        mine = [r for r in good if r["model"] == model]
        threads = sorted({r["threads"] for r in mine})
        for t in threads:
            by = {r["setting"]: r for r in mine if r["threads"] == t}
            out.append({"model": model, "threads": t, **_ratios(by)})
        if len(threads) > 1:
            best: dict[str, dict[str, Any]] = {}
            for r in mine:
                if r["setting"] not in best or r["round_s"] < best[r["setting"]]["round_s"]:
                    best[r["setting"]] = r
            choice = {k: v["threads"] for k, v in best.items()}
            out.append({"model": model, "threads": "best", **_ratios(best), **choice})
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per setting."""
    head = (
        f"{'setting':9} {'model':9} {'threads':>7} {'start-up s':>10} {'round s':>9} "
        f"{'(min)':>8} {'img/s':>9} {'host MiB':>9} {'tree PSS':>9} {'GPU MiB':>8} {'acc':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['setting']:9} {r.get('model', ''):9} FAILED: {r['error']}")
            continue
        gpu = r.get("peak_gpu_mib_per_actor", r.get("peak_gpu_mib"))
        # Threads asked for, then what torch used (and, for Flower, in the Ray actors).
        thr = f"{r['threads'][0]}:{r['torch_threads']}"
        if "actor_torch_threads" in r:
            thr += f"/{r['actor_torch_threads']}"
        print(
            f"{r['setting']:9} {r['model']:9} {thr:>7} {r['startup_s']:>10.2f} "
            f"{r['round_s']:>9.4f} {r['round_s_min']:>8.4f} {r['images_per_s']:>9.0f} "
            f"{r['peak_rss_mib']:>9.0f} {r.get('peak_tree_pss_mib') or 0:>9.0f} "
            f"{gpu if gpu is not None else '-':>8} {r.get('accuracy', float('nan')):>6.3f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dataset",
        choices=("auto", "digits", "cifar10"),
        default="auto",
        help="auto: cifar10 on CUDA, digits on CPU",
    )
    p.add_argument(
        "--data-root",
        default=str(DEFAULT_CIFAR_ROOT),
        help="CIFAR-10 image-folder tree (train/<class>/*.jpg, test/<class>/*.jpg)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="comma-separated fedimb models (default: mlp on CPU, cnn,resnet32 on CUDA)",
    )
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rounds", type=int, default=None, help="default 10 (CPU), 5 (CUDA)")
    p.add_argument(
        "--threads",
        choices=("default", "1", "both"),
        default="default",
        help="torch threads in every process: torch's default, 1, or run both",
    )
    p.add_argument(
        "--settings",
        default=",".join(ALL_SETTINGS),
        help=f"comma-separated subset of {', '.join(ALL_SETTINGS)}",
    )
    p.add_argument("--group-size", type=int, default=0, help="clients per vectorised step")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 autocast for fedimb, vmap and bigbatch (flower and loop stay fp32)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="cuDNN autotuning for fedimb, vmap and bigbatch (fedimb's cudnn-benchmark key)",
    )
    p.add_argument(
        "--stock-data",
        choices=("tensors", "quickstart"),
        default="tensors",
        help="the stock settings' samples: normalised once (tensors, a lower bound) or "
        "PIL images transformed when loaded, as Flower's PyTorch quickstart",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 10 clients, 3 rounds, digits (cifar10 without scikit-learn)",
    )
    p.add_argument(
        "--memory-1000",
        action="store_true",
        help="peak host memory of 1,000 clients on CIFAR-10 (cnn, 1 round)",
    )
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per setting")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error(f"--clients {args.clients}: must be >= 1")
    valid = ALL_SETTINGS + MEMORY_SETTINGS
    unknown = set(args.settings.split(",")) - set(valid)
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}; valid: {', '.join(valid)}")
    return args


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu`` (torch imported only here)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def workloads(args: argparse.Namespace, device: str) -> list[Workload]:
    """The workloads to run: one per model and thread setting."""
    dataset = (
        args.dataset if args.dataset != "auto" else ("cifar10" if device == "cuda" else "digits")
    )
    models = args.model or ("cnn,resnet32" if device == "cuda" else "mlp")
    clients, rounds = args.clients, args.rounds or (5 if device == "cuda" else 10)
    if args.memory_1000:
        dataset, models, clients, rounds = "cifar10", args.model or "cnn", 1000, 1
    if args.quick:
        # digits needs scikit-learn, which a torch-only machine may lack.
        has_sklearn = importlib.util.find_spec("sklearn") is not None
        dataset = "digits" if has_sklearn else "cifar10"
        clients, rounds = 10, 3
    if dataset == "cifar10" and not (Path(args.data_root) / "train").is_dir():
        raise SystemExit(
            f"--data-root {args.data_root}: no train/ folder there; pass the CIFAR-10 "
            "image-folder tree (train/<class>/*.jpg, test/<class>/*.jpg)"
        )
    threads = ("default", "1") if args.threads == "both" else (args.threads,)
    group = args.group_size or (100 if args.memory_1000 else 0)
    return [
        Workload(
            dataset=dataset,
            data_root=str(Path(args.data_root).resolve()) if dataset == "cifar10" else "",
            model=model,
            device=device,
            clients=clients,
            rounds=rounds,
            threads=t,
            group_size=group,
            precision=args.precision,
            cudnn_benchmark=args.cudnn_benchmark,
            stock_data=args.stock_data,
        )
        for model in models.split(",")
        for t in threads
    ]


def machine_info(device: str) -> dict[str, Any]:
    """Versions, cores, load and the GPU's name: the context of the numbers."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
    }
    for lib in ("flwr", "ray"):
        try:
            info[lib] = importlib.import_module(lib).__version__
        except ImportError:
            info[lib] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def chosen_settings(args: argparse.Namespace) -> list[str]:
    """The settings to run, in order, less those whose libraries are missing (said)."""
    if args.memory_1000:
        names = list(MEMORY_SETTINGS)
        if args.settings != ",".join(ALL_SETTINGS):
            names = [s for s in args.settings.split(",") if s in MEMORY_SETTINGS]
    else:
        names = args.settings.split(",")
    missing = {s: [m for m in NEEDS.get(s, ()) if not importable(m)] for s in names}
    for setting, modules in missing.items():
        if modules:
            print(f"note: skipping {setting}: {', '.join(modules)} cannot be imported")
    return [s for s in names if not missing[s]]


def run_settings(
    settings: Sequence[str],
    runs: Sequence[Workload],
    timeout: float,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict]:
    """Prepare the data once, then run every setting of every workload in its own process.

    Each setting's result is printed as it ends and passed (with those before it) to
    ``on_row``, so a run cut short still leaves what it measured.
    """
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        log_dir = Path(tmp)
        prep = run_worker("prepare", runs[0], log_dir, timeout)
        if "error" in prep:
            print(prep["log_tail"])
            raise SystemExit(f"preparing the data failed: {prep['error']}")
        print(f"workload: {dataclasses.asdict(runs[0])} | images/round {prep['images_per_round']}")
        # Thread settings of one setting run back to back: the load of a shared
        # machine changes less between the two.
        order = sorted(
            ((w, s) for w in runs for s in settings),
            key=lambda ws: (ws[0].model, settings.index(ws[1])),
        )
        for w, setting in order:
            print(f"running {setting} (model {w.model}, threads {w.threads}) ...", flush=True)
            row = run_worker(setting, w, log_dir, timeout)
            if "error" in row:
                print(row["log_tail"][-1500:])
            elif row.get("partition") != prep["partition"]:
                row["error"] = "partition differs from the reference partition"
            elif "round_s" in row:
                print(
                    f"  start-up {row['startup_s']:.2f} s, round {row['round_s']:.4f} s "
                    f"({row['images_per_s']:.0f} img/s), GPU MiB {row.get('peak_gpu_mib', '-')}",
                    flush=True,
                )
            rows.append(row)
            on_row(rows)
    return rows


def print_memory(rows: Sequence[dict[str, Any]]) -> None:
    """The memory check: peak host memory per variant against 8 GiB."""
    for r in rows:
        if "error" in r:
            print(f"{r['setting']}: FAILED: {r['error']}")
            continue
        peak = max(r["peak_rss_mib"], r.get("peak_tree_pss_mib") or 0)
        r["under_8_gib"] = peak < 8 * 1024
        print(
            f"{r['setting']} ({r['path']}): peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"round {r.get('round_s_all')} s, process total {r['total_s']:.0f} s "
            f"-> under 8 GiB: {r['under_8_gib']}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one setting of it)."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)
    device = resolve_device(args.device)
    runs = workloads(args, device)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine_info(device)}
    report["flower_free_imports"] = flower_free_imports()
    pulled = {m: v for m, v in report["flower_free_imports"].items() if v}
    print("flwr/ray imported by the fedimb modules of the no-flwr path:", pulled or "none")
    settings = chosen_settings(args)

    def save(rows: list[dict[str, Any]], partial: bool = True) -> None:
        if args.out:
            report.update(results=rows, partial=partial)
            atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")

    rows = run_settings(settings, runs, args.timeout, on_row=save)
    report["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    report["workloads"] = [dataclasses.asdict(w) for w in runs]
    report["results"] = rows
    print()
    if args.memory_1000:
        print_memory(rows)
    else:
        print_table(rows)
        report["ratios"] = compare(rows)
        print()
        for entry in report["ratios"]:
            print(json.dumps(entry))
    if args.out:
        save(rows, partial=False)
        print(f"\nwrote {args.out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    # Run the copy imported under the module's own name, not ``__main__``: Ray pickles
    # functions of ``__main__`` by value, which would give every message a fresh, empty
    # client cache; ``bench_round.stock_train`` is pickled by reference instead.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(importlib.import_module("bench_round").main())
