"""Datasets as in-memory tensors, with an on-disk cache of decoded images.

:func:`load_dataset` returns a :class:`Dataset`: train and test tensors (uint8 NCHW for
images, float32 ``[N, D]`` for feature data), class names and per-channel normalisation
constants. Images stay uint8 until a batch is normalised on its device with
:meth:`Dataset.to_float`, which keeps resident client data four times smaller.

Datasets (names in :data:`DATASETS`):

- ``"digits"``: scikit-learn's bundled 8x8 digits (no download, the default);
- ``"cifar10"``, ``"cifar100"``, ``"mnist"``, ``"fashion-mnist"``: through torchvision;
- ``"imagefolder"``: a ``root/{train,test}/<class>/<image>`` tree;
- ``"imdb"``: IMDB movie reviews as token ids (:mod:`fedimb.data.text`);
- ``"synthetic"``: class-separable Gaussian features, for tests.

Decoded datasets (all but ``digits`` and ``synthetic``, which build instantly) are cached
as one torch file in ``cache_dir`` (default ``$FEDIMB_CACHE`` or ``~/.cache/fedimb``),
keyed by dataset name, resolved root, parameters and a fingerprint of the source files
(relative paths, sizes, mtimes), so a changed source is decoded again.

Modules: ``core`` (the type, registry and :func:`load_dataset`), ``cache`` (the disk
cache), ``builtin`` (digits, synthetic, torchvision) and ``images`` (image folders).
"""

# builtin and images register their loaders when imported (builtin first, as before).
from fedimb.data.datasets import builtin
from fedimb.data.datasets.cache import CACHE_FORMAT, cached_dataset, tree_fingerprint
from fedimb.data.datasets.core import (
    BUNDLED_DATASETS,
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    LoaderFn,
    default_cache_dir,
    default_data_root,
    list_datasets,
    load_dataset,
    make_dataset,
)
from fedimb.data.datasets.images import IMAGE_EXTENSIONS, decode_images

__all__ = [
    "BUNDLED_DATASETS",
    "CACHE_FORMAT",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "Dataset",
    "DatasetNotFoundError",
    "LoaderFn",
    "builtin",
    "cached_dataset",
    "decode_images",
    "default_cache_dir",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "make_dataset",
    "tree_fingerprint",
]
