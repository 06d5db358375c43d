"""How many distinct input shapes the vectorised trainer's steps see over a run.

cuDNN autotuning (``cudnn-benchmark``) times every new input shape once. A vectorised
step's shape is (clients still training at that step, the step's batch length), so it
depends on which clients a round samples and how many samples each holds. This script
draws a partition of CIFAR-10-sized labels (5,000 per class, 10 classes) with fedimb's
own partitioners, samples clients uniformly each round (as Flower's strategies do),
builds every sampled client's plan with ``fedimb.train.make_plan`` and counts the
distinct step shapes seen after each round. No torch device, no data files.

Example::

    python benchmarks/step_shapes.py --clients 1000 --sample 100 --partition dirichlet \\
        --alpha 0.5 --rounds 200 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from fedimb.data import partition
from fedimb.train import TrainSettings, client_rng, make_plan

REPORT_AFTER = (1, 10, 50, 100, 200)


def step_shapes(plans: Sequence) -> set[tuple[int, int]]:
    """The (clients training, batch length) of each step of these clients' plans, as
    ``fedimb.batched`` trains them: a step's short batches are padded to its longest."""
    shapes = set()
    for t in range(max(plan.num_steps for plan in plans)):
        lengths = [len(plan.batches[t]) for plan in plans if plan.num_steps > t]
        shapes.add((len(lengths), max(lengths)))
    return shapes


def distinct_shapes_per_round(args: argparse.Namespace, seed: int) -> list[int]:
    """Cumulative count of distinct step shapes after each round of one run."""
    labels = np.repeat(np.arange(10), 5000)
    rng = np.random.default_rng(seed)
    params = {"alpha": args.alpha} if args.partition.startswith("dirichlet") else {}
    parts = partition(args.partition, labels, args.clients, rng, **params)
    settings = TrainSettings(batch_size=args.batch_size)
    seen: set[tuple[int, int]] = set()
    counts = []
    for server_round in range(1, args.rounds + 1):
        picked = sorted(rng.choice(args.clients, args.sample, replace=False))
        plans = [
            make_plan(labels[parts[pid]], settings, client_rng(seed, server_round, pid))
            for pid in picked
        ]
        seen |= step_shapes(plans)
        counts.append(len(seen))
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--sample", type=int, default=100, help="clients trained per round")
    p.add_argument("--partition", default="dirichlet", help="a fedimb partition name")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    args = p.parse_args(argv)
    if not 1 <= args.sample <= args.clients:
        p.error(f"--sample {args.sample}: must be between 1 and --clients ({args.clients})")
    rounds = [r for r in REPORT_AFTER if r <= args.rounds]
    print("distinct step shapes after round " + ", ".join(map(str, rounds)))
    for seed in (int(s) for s in args.seeds.split(",")):
        counts = distinct_shapes_per_round(args, seed)
        print(f"  seed {seed}: " + ", ".join(str(counts[r - 1]) for r in rounds))


if __name__ == "__main__":
    main()
