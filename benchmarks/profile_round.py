"""Where a fast-path round goes: the vectorised training step and the host-side work.

For each model, on the bench's workload (same data, partition, clients and jobs):

- ``train``: one round of ``fedimb.batched.train_clients`` over all clients, in four
  variants: fp32 / bf16 autocast, each with cuDNN autotuning off and on (CUDA only;
  one variant on CPU), and in fp32 with the clients split into groups of each of
  ``--group-sizes`` (as the ``group-size`` config key does). Each variant is warmed up
  by one round (its time is reported too), then timed over ``--repeats`` rounds
  (median reported).
- ``--trace``: one more fp32 round under ``torch.profiler``; the operators that took the
  most device (or, on CPU, host) time are printed and saved.
- ``host``: what the in-process engine does with the trained states before the next
  round, per stage: building the replies' ``ArrayRecord`` (fedimb's ``TensorArray``,
  and Flower's own ``Array`` for comparison), the finiteness check of every reply, and
  the ``FedAvg`` mean of the replies: Flower's (``aggregate_arrayrecords``) and the one
  fedimb's registered FedAvg family uses (``strategies.stock.weighted_array_mean``).
  Needs flwr.

Example::

    python benchmarks/profile_round.py --device cuda --model cnn,resnet32 \\
        --data-root ../shared/data/cifar10-jpeg --out benchmarks/results/profile.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_round as bench

from fedimb.results import atomic_write_text


def _timed(fn: Any, device: Any, repeats: int) -> tuple[float, float, Any]:
    """(Seconds of a first, warm-up call of ``fn()``, median seconds of ``repeats`` more
    calls, the last result)."""
    t0 = bench.stamp(device)
    out = fn()
    first = bench.stamp(device) - t0
    times = []
    for _ in range(repeats):
        t0 = bench.stamp(device)
        out = fn()
        times.append(bench.stamp(device) - t0)
    return first, statistics.median(times), out


def _variants(cuda: bool, group_sizes: list[int]) -> list[tuple[str, bool, bool, int]]:
    """(name, bf16, cuDNN autotuning, clients per group; 0 = all) of each variant."""
    pairs = [(False, False), (False, True), (True, False), (True, True)]
    out = [
        (f"{'bf16' if bf16 else 'fp32'}{'+cudnn-benchmark' if tune else ''}", bf16, tune, 0)
        for bf16, tune in (pairs if cuda else pairs[:1])
    ]
    return out + [(f"fp32, groups of {g}", False, False, g) for g in group_sizes if g > 0]


def profile_training(
    w: bench.Workload, fed: Any, repeats: int, group_sizes: list[int], trace: bool
) -> tuple[dict, list, str]:
    """Median seconds of one round of ``train_clients`` per variant (and of its first,
    warm-up round: cuDNN's autotuning happens there), the results, and the trace table."""
    import torch

    from fedimb.batched import train_clients
    from fedimb.train import TrainSettings

    device = torch.device(w.device)
    model = bench.make_model(w, fed).to(device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, float] = {}
    results: list = []

    def one_round(jobs: list, settings: Any, group: int) -> list:
        size = group or len(jobs)
        return [
            r
            for start in range(0, len(jobs), size)
            for r in train_clients(
                model, state, jobs[start : start + size], fed.dataset.to_float, settings
            )
        ]

    for name, bf16, tune, group in _variants(device.type == "cuda", group_sizes):
        settings = TrainSettings(
            epochs=w.epochs, batch_size=w.batch_size, lr=w.lr, bf16=bf16, cudnn_benchmark=tune
        )
        jobs = bench.client_jobs(w, fed, 1, settings)
        first, seconds, res = _timed(
            lambda j=jobs, s=settings, g=group: one_round(j, s, g), device, repeats
        )
        results = res if name == "fp32" else results
        out[name] = round(seconds, 4)
        out[f"{name} first"] = round(first, 4)
        print(f"  train {name:22} {seconds:.4f} s/round (first {first:.2f} s)", flush=True)
    table = ""
    if trace:
        settings = TrainSettings(epochs=w.epochs, batch_size=w.batch_size, lr=w.lr)
        jobs = bench.client_jobs(w, fed, 1, settings)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            one_round(jobs, settings, 0)
            bench.stamp(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=15)
        print(table, flush=True)
    return out, results, table


def profile_host(results: list, repeats: int) -> dict[str, float]:
    """Median seconds per host-side stage of a round, for the given trained states."""
    import numpy as np
    from bench_aggregate import median_seconds
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedimb.records import state_record
    from fedimb.server.replies import float_view
    from strategies.stock import weighted_array_mean

    def replies(make: Any) -> list[RecordDict]:
        return [
            RecordDict(
                {"arrays": make(r), "metrics": MetricRecord({"num-examples": r.num_examples})}
            )
            for r in results
        ]

    def finite(records: list[RecordDict]) -> bool:
        # As fedimb.server's guard: arrays checked on the training device are skipped.
        return all(
            getattr(a, "known_finite", False)
            or (v := float_view(a)) is None
            or bool(np.isfinite(v).all())
            for rec in records
            for a in rec["arrays"].values()
        )

    out: dict[str, float] = {}
    variants = (
        ("tensorarray", lambda r: state_record(r.state, finite=r.finite)),
        ("flower-array", lambda r: ArrayRecord(r.state)),
    )

    def mean_seconds(make: Any, aggregate: Any) -> float:
        # Fresh replies for every repeat, as every round has: nothing cached between them.
        return median_seconds(aggregate, lambda: replies(make), repeats)[1]

    for label, make in variants:
        _, build, recs = _timed(lambda m=make: replies(m), None, repeats)
        _, check, _ = _timed(lambda r=recs: finite(r), None, repeats)
        agg = mean_seconds(make, aggregate_arrayrecords)
        ours = mean_seconds(make, weighted_array_mean)
        out.update({f"{label}_build": build, f"{label}_finite": check, f"{label}_fedavg": agg})
        out[f"{label}_torch_mean"] = ours
        print(
            f"  host  {label:13} build {build:.4f} s, finite check {check:.4f} s, "
            f"FedAvg mean: Flower {agg:.4f} s, fedimb {ours:.4f} s",
            flush=True,
        )
    return {k: round(v, 4) for k, v in out.items()}


def host_total(host: dict[str, float]) -> float:
    """Per-round host work of the in-process engine's replies: building them, the
    finiteness check and fedimb's FedAvg mean (``profile_host``'s ``tensorarray`` rows)."""
    return sum(host[f"tensorarray_{stage}"] for stage in ("build", "finite", "torch_mean"))


def profile_outside(w: bench.Workload, rounds: int) -> dict[str, float]:
    """Seconds per round that a real run spends outside ``train_clients``: the in-process
    engine, job building, replies, the strategy's checks and mean, the metrics rows.

    Runs ``fedimb.sim.run_experiment`` (``batched = "on"``, evaluation only at the end),
    times every ``train_clients`` call, and reports the medians over rounds 2.. of the
    round, its training and their difference.
    """
    import tempfile
    import time

    from fedimb import batched
    from fedimb.config import load_config
    from fedimb.sim import run_experiment

    overrides = {**bench.fedimb_overrides(w), "num-rounds": rounds, "eval-every": rounds}
    config = load_config(None, overrides)
    trained: list[float] = []
    ends: list[float] = []
    real = batched.train_clients

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        trained.append(time.perf_counter() - t0)
        return out

    batched.train_clients = timed
    try:
        with tempfile.TemporaryDirectory(prefix="profile-outside-") as tmp:
            run_experiment(
                config,
                Path(tmp) / "run",
                progress=False,
                on_round=lambda r, row: ends.append(time.perf_counter()),
            )
    finally:
        batched.train_clients = real
    durations = [b - a for a, b in itertools.pairwise(ends)]  # rounds 1..R
    steady = list(zip(durations[1:], trained[1 : len(durations)], strict=False))
    out = {
        "round": statistics.median(d for d, _ in steady),
        "training": statistics.median(t for _, t in steady),
        "outside_training": statistics.median(d - t for d, t in steady),
    }
    print(
        f"  run   round {out['round']:.4f} s = training {out['training']:.4f} s + outside "
        f"training {out['outside_training']:.4f} s (medians of rounds 2..{rounds})",
        flush=True,
    )
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    """Profile each model; print and optionally write the numbers as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="cnn,resnet32")
    p.add_argument("--dataset", choices=("cifar10", "digits"), default="cifar10")
    p.add_argument("--data-root", default=str(bench.DEFAULT_CIFAR_ROOT))
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--group-sizes", default="", help="comma-separated, e.g. 50,25")
    p.add_argument("--trace", action="store_true", help="torch.profiler table of one round")
    p.add_argument(
        "--outside-rounds",
        type=int,
        default=0,
        help="also run fedimb for this many rounds and time what is outside training",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    report: dict[str, Any] = {"machine": bench.machine_info(args.device), "models": {}}
    flwr = importlib.util.find_spec("flwr") is not None
    for model in args.model.split(","):
        w = bench.Workload(
            dataset=args.dataset,
            data_root=args.data_root if args.dataset == "cifar10" else "",
            model=model,
            device=args.device,
            clients=args.clients,
        )
        fed = bench.load_federation(w, w.device)
        print(f"{model}: {bench.images_per_round(w, fed)} images per round", flush=True)
        groups = [int(g) for g in args.group_sizes.split(",") if g]
        train, results, table = profile_training(w, fed, args.repeats, groups, args.trace)
        entry: dict[str, Any] = {"train_s": train}
        if table:
            entry["trace_table"] = table
        if flwr:
            entry["host_s"] = profile_host(results, args.repeats)
            total = host_total(entry["host_s"])
            entry["host_total_s"] = round(total, 4)
            print(f"  HOST TOTAL (build + finite check + fedimb mean) {total:.4f} s/round")
            if args.outside_rounds:
                entry["run_s"] = profile_outside(w, args.outside_rounds)
        if args.device == "cuda":
            entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["models"][model] = entry
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
