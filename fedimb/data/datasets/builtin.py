"""Built-in loaders: scikit-learn's digits, synthetic Gaussian blobs and the
torchvision datasets (CIFAR10/100, MNIST, FashionMNIST)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimb.data.datasets.cache import cached_dataset, stat_tree, tree_fingerprint
from fedimb.data.datasets.core import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    default_data_root,
    make_dataset,
)

# -------------------------------------------------------------------------- digits


@DATASETS.register("digits")
def _load_digits(
    root: Path | None, cache_dir: Path, *, test_per_class: int = 30, seed: int = 0
) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16) with a balanced test split.

    ``test_per_class`` samples of every class, chosen with ``seed``, form the test set;
    the rest is train.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    y = np.asarray(bunch.target, dtype=np.int64)
    counts = np.bincount(y)
    if not 1 <= test_per_class < counts.min():
        raise ValueError(
            f"test_per_class must be between 1 and {counts.min() - 1} (the smallest class "
            f"has {counts.min()} samples), got {test_per_class}"
        )
    rng = np.random.default_rng(seed)
    test_idx = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(y == c), size=test_per_class, replace=False)
                for c in range(counts.size)
            ]
        )
    )
    train_mask = np.ones(y.size, dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    yt = torch.from_numpy(y)
    return make_dataset(
        "digits",
        x[train_idx],
        yt[train_idx],
        x[test_idx],
        yt[test_idx],
        [str(c) for c in range(counts.size)],
        max_value=16.0,
    )


@DATASETS.register("synthetic")
def _load_synthetic(
    root: Path | None,
    cache_dir: Path,
    *,
    num_classes: int = 10,
    samples_per_class: int = 100,
    test_per_class: int = 20,
    dim: int = 16,
    separation: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """Gaussian blobs: class ``c`` is ``N(mu_c, I)`` with ``|mu_c| = separation``.

    The class means are orthonormal directions when ``dim >= num_classes`` (pairwise
    distance ``separation * sqrt(2)``), random unit directions otherwise.
    """
    for pname, value in (
        ("num_classes", num_classes),
        ("samples_per_class", samples_per_class),
        ("test_per_class", test_per_class),
        ("dim", dim),
    ):
        if value < 1:
            raise ValueError(f"{pname} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    if dim >= num_classes:
        q, _ = np.linalg.qr(rng.standard_normal((dim, num_classes)))
        means = q.T
    else:
        means = rng.standard_normal((num_classes, dim))
        means /= np.linalg.norm(means, axis=1, keepdims=True)
    means = means * separation

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.repeat(np.arange(num_classes), per_class)
        x = means[y] + rng.standard_normal((y.size, dim))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)

    x_tr, y_tr = draw(samples_per_class)
    x_te, y_te = draw(test_per_class)
    return make_dataset(
        "synthetic", x_tr, y_tr, x_te, y_te, [f"class{c}" for c in range(num_classes)], 1.0
    )


# --------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class _TorchvisionSpec:
    cls: str  # attribute of torchvision.datasets, looked up at call time
    folder: str  # where torchvision keeps the files, relative to root
    layout: str  # "nhwc" (numpy, CIFAR) or "nhw" (tensor, MNIST)


_TORCHVISION = {
    "cifar10": _TorchvisionSpec("CIFAR10", "cifar-10-batches-py", "nhwc"),
    "cifar100": _TorchvisionSpec("CIFAR100", "cifar-100-python", "nhwc"),
    "mnist": _TorchvisionSpec("MNIST", "MNIST/raw", "nhw"),
    "fashion-mnist": _TorchvisionSpec("FashionMNIST", "FashionMNIST/raw", "nhw"),
}


def _torchvision_split(name: str, root: Path, train: bool) -> Any:
    """Construct the torchvision dataset, downloading only when it is missing."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION[name].cls)
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        pass  # not there (or corrupt): try a download
    try:
        return cls(str(root), train=train, download=True)
    except Exception as exc:
        raise DatasetNotFoundError(
            f"dataset {name!r} is not in {root / _TORCHVISION[name].folder} and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). Put the torchvision files there "
            f"(root={root}, or set FEDIMB_DATA), or use dataset 'imagefolder' with a local "
            "tree root/train/<class>/*.jpg and root/test/<class>/*.jpg"
        ) from exc


def _torchvision_tensors(name: str, split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.as_tensor(np.asarray(split.data), dtype=torch.uint8)
    x = data.permute(0, 3, 1, 2) if _TORCHVISION[name].layout == "nhwc" else data.unsqueeze(1)
    y = torch.as_tensor(np.asarray(split.targets), dtype=torch.int64)
    return x.contiguous(), y


def _load_torchvision(name: str, root: Path | None, cache_dir: Path) -> Dataset:
    root = (root or default_data_root()).resolve()
    src = root / _TORCHVISION[name].folder

    def fingerprint() -> str | None:
        files = stat_tree(src) if src.is_dir() else []
        return tree_fingerprint(files) if files else None

    def build() -> Dataset:
        train = _torchvision_split(name, root, train=True)
        test = _torchvision_split(name, root, train=False)
        x_tr, y_tr = _torchvision_tensors(name, train)
        x_te, y_te = _torchvision_tensors(name, test)
        return make_dataset(name, x_tr, y_tr, x_te, y_te, list(train.classes), 255.0)

    return cached_dataset(cache_dir, name, root, {}, fingerprint, build)


@DATASETS.register("cifar10")
def load_cifar10(root: Path | None, cache_dir: Path) -> Dataset:
    """torchvision's CIFAR10, downloaded into ``root``."""
    return _load_torchvision("cifar10", root, cache_dir)


@DATASETS.register("cifar100")
def load_cifar100(root: Path | None, cache_dir: Path) -> Dataset:
    """torchvision's CIFAR100, downloaded into ``root``."""
    return _load_torchvision("cifar100", root, cache_dir)


@DATASETS.register("mnist")
def load_mnist(root: Path | None, cache_dir: Path) -> Dataset:
    """torchvision's MNIST, downloaded into ``root``."""
    return _load_torchvision("mnist", root, cache_dir)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path | None, cache_dir: Path) -> Dataset:
    """torchvision's FashionMNIST, downloaded into ``root``."""
    return _load_torchvision("fashion-mnist", root, cache_dir)
