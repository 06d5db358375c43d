"""How long the server's FedAvg mean takes: Flower's numpy one against fedimb's torch one.

The replies are built as each engine builds them, from one round of synthetic client
weights in a model's shapes: in-process (``TensorArray`` views of the stacked weights,
as ``fedimb.batched`` leaves them) and plain Flower ``Array`` s (``.npy`` bytes, as
replies arrive through Ray). For each torch thread count, both means run on the same
replies (fresh record objects each repeat, a warm-up first); the script prints the
median seconds, the ratio and whether the two results are bit for bit equal. Host only:
it needs torch, numpy and flwr, no GPU.

Example::

    python benchmarks/bench_aggregate.py --model cnn --clients 100 --threads 1,2 \\
        --out benchmarks/results/cpu-aggregate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_round import machine_info

from fedimb.results import atomic_write_text

# The model's input shape and classes: CIFAR-10's.
INPUT_SHAPE, NUM_CLASSES = (3, 32, 32), 10


def client_stacks(model: str, clients: int, seed: int = 0) -> dict[str, Any]:
    """Per state key, a [clients, ...] float32 stack of random weights in the model's shapes."""
    import torch

    from fedimb.models import build_model

    shapes = {
        k: v.shape for k, v in build_model(model, INPUT_SHAPE, NUM_CLASSES).state_dict().items()
    }
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn((clients, *s), generator=gen) for k, s in shapes.items()}


def replies(stacks: dict[str, Any], kind: str) -> list[Any]:
    """One reply content per client: ``kind`` "in-process" (TensorArray) or "plain" (Array)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedimb.records import state_record

    clients = next(iter(stacks.values())).shape[0]
    out = []
    for k in range(clients):
        state = {name: stack[k] for name, stack in stacks.items()}
        arrays = (
            state_record(state)
            if kind == "in-process"
            else ArrayRecord({n: Array(t.numpy()) for n, t in state.items()})
        )
        out.append(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 400 + k})})
        )
    return out


def median_seconds(aggregate: Any, make: Any, repeats: int) -> tuple[float, float, Any]:
    """(first call's seconds, median of the next ``repeats``, the last result)."""
    times, result = [], None
    for _ in range(repeats + 1):
        contents = make()
        start = time.perf_counter()
        result = aggregate(contents, "num-examples")
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), result


def main(argv: list[str] | None = None) -> int:
    """Time both means per reply kind and thread count; print and optionally save JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", help="a fedimb model name (CIFAR-10 shapes)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="", help="torch thread counts, e.g. 1,2 (default: torch's)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from strategies.stock import weighted_array_mean

    threads = [int(t) for t in args.threads.split(",") if t] or [torch.get_num_threads()]
    stacks = client_stacks(args.model, args.clients)
    mib = sum(s.numel() * s.element_size() for s in stacks.values()) / 2**20
    print(f"{args.model}: {args.clients} replies, {mib:.0f} MiB of weights", flush=True)
    rows = []
    for kind in ("in-process", "plain"):
        for n in threads:
            torch.set_num_threads(n)
            make = lambda kind=kind: replies(stacks, kind)  # noqa: E731
            f_first, flower, want = median_seconds(aggregate_arrayrecords, make, args.repeats)
            t_first, ours, got = median_seconds(weighted_array_mean, make, args.repeats)
            equal = all(np.array_equal(got[k].numpy(), a.numpy()) for k, a in want.items())
            row = {
                "replies": kind,
                "threads": n,
                "flower_s": round(flower, 4),
                "torch_s": round(ours, 4),
                "flower_first_s": round(f_first, 4),
                "torch_first_s": round(t_first, 4),
                "speed_up": round(flower / ours, 2),
                "bit_equal": equal,
            }
            rows.append(row)
            print(
                f"  {kind:10} threads {n:2}: Flower {flower:.4f} s, torch {ours:.4f} s "
                f"({row['speed_up']:.2f}x; first calls {f_first:.4f} / {t_first:.4f} s), "
                f"bit-equal {equal}",
                flush=True,
            )
    if args.out:
        report = {"machine": machine_info("cpu"), "model": args.model, "clients": args.clients,
                  "weights_mib": round(mib, 1), "repeats": args.repeats, "rows": rows}  # fmt: skip
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return 0 if all(r["bit_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
