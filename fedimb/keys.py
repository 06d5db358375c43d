"""What each config key means, for ``fedimb list keys`` (defaults come from the config's
own fields, so they cannot drift from what a run uses)."""

from __future__ import annotations

MEANINGS: dict[str, str] = {
    "dataset": "a registered dataset (fedimb list datasets) or 'package.module:loader'",
    "data-root": "the dataset's folder ('' = its default)",
    "num-clients": "clients in the federation",
    "num-rounds": "federated rounds",
    "local-epochs": "epochs each sampled client trains per round",
    "batch-size": "local batch size",
    "lr": "the clients' SGD learning rate (see [lr-schedule])",
    "momentum": "the clients' SGD momentum",
    "weight-decay": "the clients' SGD weight decay",
    "optimizer-state": "'keep': a client's SGD momentum carries over to its next round",
    "seed": "initialisation, client sampling, local shuffling, augmentation (and the data "
    "split unless data-seed is set)",
    "data-seed": "the long tail, subsample and partition (-1 = seed)",
    "engine": "'ray' (Flower's simulation engine) or 'inprocess' (no Ray, same results)",
    "device": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'",
    "augment": "random crop + flip on the device; 'auto' = on for 32x32 images",
    "batched": "in-process engine: train a round's clients as one vectorised step",
    "group-size": "clients per vectorised step (0 = the whole round)",
    "threads": "torch threads of the server's process (0 = auto)",
    "precision": "'fp32', or 'bf16' autocast on CUDA",
    "channels-last": "channels-last memory format on CUDA",
    "cudnn-benchmark": "cuDNN autotuning while clients train (CUDA)",
    "eval-every": "rounds between evaluations of the global model (the last always)",
    "eval-batch-size": "batch size of the server's evaluation",
    "checkpoint-every": "rounds between checkpoints (0 = never; the last always)",
    "max-failure-fraction": "share of a round's clients that may fail before the run stops",
    "client-timeout": "seconds a client may train before its reply is left out (0 = no limit)",
    "round-timeout": "seconds the server waits for a round's replies",
    "out-dir": "the results folder ('' = a new one under results/)",
    "loggers": "per-round loggers, comma-separated: 'tensorboard' or 'package.module:factory' "
    "(docs/logging.md)",
    "long-tail.ratio": "global long tail before the partition: n_max / n_min (1 = none)",
    "long-tail.profile": "the long tail's shape: 'exp' or 'step'",
    "long-tail.keep": "per-class keep fractions instead of a ratio, e.g. '0.1,1.0'",
    "text.vocab-size": "token datasets (imdb): vocabulary size, padding and unknown included",
    "text.max-len": "token datasets (imdb): tokens kept per document (the rest padded)",
    "long-tail.many-shot-above": "metrics: classes with more training samples are many-shot",
    "long-tail.few-shot-below": "metrics: classes with fewer training samples are few-shot",
    "subsample.fraction": "keep this share of each class's training samples (seeded)",
    "subsample.per-class-cap": "then at most this many per class (0 = no cap)",
    "ray.address": "an existing Ray cluster ('' = start a local one)",
    "ray.client-cpus": "CPUs per client actor",
    "ray.client-gpus": "GPUs per client actor (fractions share one)",
    "lr-schedule.warmup-rounds": "round r <= W trains at lr * r / W (0 = no warm-up)",
    "lr-schedule.decay": "lr is multiplied by this every round after the first",
    "lr-schedule.milestones": "rounds (or fractions of num-rounds) where lr drops by gamma",
    "lr-schedule.gamma": "the factor of each milestone",
    "faults.raise-clients": "test only: client ids that raise",
    "faults.nan-clients": "test only: client ids that reply NaN weights",
    "faults.slow-clients": "test only: client ids that sleep slow-s seconds",
    "faults.slow-s": "test only: how long slow clients sleep",
    "faults.rounds": "test only: rounds where faults fire ('' = all)",
    "strategy.fraction-train": "share of the clients sampled each round",
    "strategy.min-train-clients": "fewest clients a round trains (Flower's min-train-nodes "
    "and min-available-nodes)",
}

# The component tables: what their name picks.
TABLE_MEANINGS: dict[str, str] = {
    "partition": "who holds what",
    "loss": "each client's local loss, built from its own class counts",
    "sampling": "local re-sampling of each client's data",
    "strategy": "the server's aggregation",
    "model": "the network",
}
