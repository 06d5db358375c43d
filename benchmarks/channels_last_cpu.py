"""Channels-last against the default memory order for fedimb's conv models on a CPU.

Interleaves the two orders (NCHW, then channels-last, repeated) so that a shared
machine's load falls on both alike, and reports each one's minimum and median seconds
and the ratio of the minima: an evaluation forward pass of ``--eval-batch`` images (no
gradient) and a training step (forward, backward) at ``--batch``.

Example::

    python benchmarks/channels_last_cpu.py --threads 1 --repeats 7 \\
        --out benchmarks/results/cpu-channels-last.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedimb.models import build_model


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(name: str, eval_batch: int, batch: int, repeats: int) -> dict[str, object]:
    """Interleaved timings of one model in both memory orders."""
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10)
    x_eval = torch.randn(eval_batch, 3, 32, 32)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    orders = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    times: dict[str, dict[str, list[float]]] = {o: {"eval": [], "train": []} for o in orders}

    def run(order: str) -> tuple[float, float]:
        fmt = orders[order]
        model.to(memory_format=fmt)
        xe, xt = x_eval.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
        model.eval()
        with torch.no_grad():
            ev = _seconds(lambda: model(xe))
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt), y).backward()

        return ev, _seconds(step)

    for order in orders:  # warm-up
        run(order)
    for _ in range(repeats):
        for order in orders:
            ev, tr = run(order)
            times[order]["eval"].append(ev)
            times[order]["train"].append(tr)
    out: dict[str, object] = {"model": name}
    for kind in ("eval", "train"):
        for order in orders:
            out[f"{kind}_{order}_min_s"] = round(min(times[order][kind]), 4)
            out[f"{kind}_{order}_median_s"] = round(statistics.median(times[order][kind]), 4)
        out[f"{kind}_speedup"] = round(
            min(times["nchw"][kind]) / min(times["channels_last"][kind]), 2
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,simple-cnn,resnet32,pfl-cnn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-batch", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = compare(name, args.eval_batch, args.batch, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
