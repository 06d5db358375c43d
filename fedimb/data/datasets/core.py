"""The :class:`Dataset` type, the :data:`DATASETS` registry and :func:`load_dataset`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedimb.registry import Registry, callable_params


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are missing and cannot be downloaded."""


@dataclass
class Dataset:
    """A labelled train/test split held as tensors.

    Attributes
    ----------
    name : str
        Dataset name.
    x_train, x_test : torch.Tensor
        uint8 ``[N, C, H, W]`` for images, float32 ``[N, D]`` for feature data.
    y_train, y_test : torch.Tensor
        int64 labels in ``[0, num_classes)``.
    classes : list of str
        Class names; index = label.
    mean, std : tuple of float
        Per-channel (per-feature for ``[N, D]`` data) statistics of the train split
        after division by ``max_value``.
    max_value : float
        Value of full intensity (255 for 8-bit images, 16 for digits, 1 for features).
    vocab_size : int
        For token data (int ``[N, L]`` ids, 0 = padding): ids lie in ``[0, vocab_size)``
        and :meth:`to_float` passes them through. 0 for images and features.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_value: float
    vocab_size: int = 0
    _norm: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: x_{split} has {x.shape[0]} samples but y_{split} {y.shape[0]}"
                )
        if len(self.mean) != len(self.std):
            raise ValueError(f"{self.name}: mean has {len(self.mean)} entries, std {len(self.std)}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def is_tokens(self) -> bool:
        """Whether samples are sequences of token ids (text), not pixels or features."""
        return self.vocab_size > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` for images, ``(D,)`` for features."""
        return tuple(self.x_train.shape[1:])

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch: ``(x / max_value - mean) / std`` per channel, float32.

        Runs on ``x``'s device; the constants are moved there once and reused. Token ids
        are returned as they are (an embedding reads them).
        """
        if self.is_tokens:
            return x
        key = f"{x.device}/{x.ndim}"
        if key not in self._norm:
            shape = (1, len(self.mean)) + (1,) * (x.ndim - 2)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
            self._norm[key] = (mean, std)
        mean, std = self._norm[key]
        return (x.to(torch.float32) / self.max_value - mean) / std


LoaderFn = Callable[..., Dataset]

DATASETS: Registry[LoaderFn] = Registry("dataset")
"""Dataset loaders, called as ``loader(root: Path | None, cache_dir: Path, **params)``."""


# Datasets made in memory (bundled with scikit-learn, or drawn): data-root means nothing.
BUNDLED_DATASETS = frozenset({"digits", "synthetic"})


def list_datasets() -> list[str]:
    """Names of the registered datasets."""
    return DATASETS.names()


def default_data_root() -> Path:
    """Where torchvision datasets are downloaded: ``$FEDIMB_DATA`` or ``~/.cache/fedimb/data``."""
    env = os.environ.get("FEDIMB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedimb" / "data"


def default_cache_dir() -> Path:
    """Where decoded datasets are cached: ``$FEDIMB_CACHE`` or ``~/.cache/fedimb``."""
    env = os.environ.get("FEDIMB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedimb"


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    **params: Any,
) -> Dataset:
    """Load dataset ``name`` as tensors.

    Parameters
    ----------
    name : str
        A name in :data:`DATASETS` (see :func:`list_datasets`) or an import path
        ``"pkg.mod:loader"`` to a function ``(root, cache_dir, **params) -> Dataset``.
    root : path, optional
        Source directory: required for ``imagefolder``; the download directory for
        torchvision datasets (default :func:`default_data_root`); unused otherwise.
    cache_dir : path, optional
        Cache of decoded datasets (default :func:`default_cache_dir`).
    **params
        Dataset parameters, e.g. ``test_per_class`` for digits.

    Raises
    ------
    ValueError
        For an unknown name (listing valid ones) or parameter.
    DatasetNotFoundError
        If the source files are missing and cannot be fetched.
    """
    loader = DATASETS.get(name)
    valid, takes_any = callable_params(loader, skip=2)  # after root and cache_dir
    if not takes_any:
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for dataset {name!r}; valid: {valid or 'none'}"
            )
    root_path = Path(root).expanduser() if root is not None else None
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dataset = loader(root_path, cache_path, **params)
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset {name!r} returned a {type(dataset).__name__}; a dataset loader must "
            "return a fedimb.data.datasets.Dataset"
        )
    return dataset


# ------------------------------------------------------------------------ statistics


def _channel_stats(
    x: torch.Tensor, max_value: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``x / max_value`` over the train split.

    uint8 images go through a 256-bin histogram per channel: exact, and no float copy of
    the whole split is made.
    """
    if x.dtype == torch.uint8:
        values = torch.arange(256, dtype=torch.float64) / max_value
        means, stds = [], []
        for c in range(x.shape[1]):
            hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
            n = hist.sum()
            m = (hist * values).sum() / n
            var = (hist * (values - m) ** 2).sum() / n
            means.append(float(m))
            stds.append(max(float(var.sqrt()), 1e-6))
        return tuple(means), tuple(stds)
    flat = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1) / max_value
    std = flat.std(dim=1, unbiased=False).clamp_min(1e-6)
    return tuple(flat.mean(dim=1).tolist()), tuple(std.tolist())


def make_dataset(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    classes: Sequence[str],
    max_value: float,
) -> Dataset:
    """A :class:`Dataset` from its tensors, with the train split's channel statistics
    (what a user's loader by import path returns: ``loader(root, cache_dir, **params)``).

    ``x``: uint8 ``[N, C, H, W]`` images (``max_value`` 255) or float ``[N, D]`` features
    (``max_value`` 1); ``y``: labels in ``[0, len(classes))``.
    """
    mean, std = _channel_stats(x_train, max_value)
    return Dataset(
        name=name,
        x_train=x_train.contiguous(),
        y_train=y_train.to(torch.int64),
        x_test=x_test.contiguous(),
        y_test=y_test.to(torch.int64),
        classes=list(classes),
        mean=mean,
        std=std,
        max_value=float(max_value),
    )
