"""Datasets (images, features, text), non-IID partitions, on-device augmentation and
partition inspection."""

from fedimb.data import text  # registers the text datasets
from fedimb.data.augment import AUGMENTED_DATASETS, default_augment, random_crop_flip
from fedimb.data.datasets import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    decode_images,
    default_cache_dir,
    default_data_root,
    list_datasets,
    load_dataset,
    make_dataset,
)
from fedimb.data.inspect import format_counts, plot_counts_heatmap, summarize_counts
from fedimb.data.partition import (
    PARTITIONERS,
    class_counts,
    dirichlet,
    iid,
    keep_fractions,
    label_skew,
    long_tail,
    long_tail_counts,
    partition,
    partition_params,
    shards,
)

__all__ = [
    "AUGMENTED_DATASETS",
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "DatasetNotFoundError",
    "class_counts",
    "decode_images",
    "default_augment",
    "default_cache_dir",
    "default_data_root",
    "dirichlet",
    "format_counts",
    "iid",
    "keep_fractions",
    "label_skew",
    "list_datasets",
    "load_dataset",
    "long_tail",
    "long_tail_counts",
    "make_dataset",
    "partition",
    "partition_params",
    "plot_counts_heatmap",
    "random_crop_flip",
    "shards",
    "summarize_counts",
    "text",
]
