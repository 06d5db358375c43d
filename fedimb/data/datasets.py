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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimb.registry import Registry, callable_params

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "decode_images",
    "default_cache_dir",
    "default_data_root",
    "list_datasets",
    "load_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CACHE_FORMAT = 1  # bump when the cached layout changes, so old files are not read


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


# ----------------------------------------------------------------------------- cache


def tree_fingerprint(files: Sequence[tuple[str, int, int]]) -> str:
    """sha256 of sorted ``(relative path, size, mtime_ns)`` triples."""
    h = hashlib.sha256()
    for rel, size, mtime in sorted(files):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _stat_tree(top: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every regular file under ``top``."""
    out = []
    for dirpath, _, filenames in os.walk(top):
        for fname in filenames:
            st = os.stat(os.path.join(dirpath, fname))
            out.append(
                (os.path.relpath(os.path.join(dirpath, fname), top), st.st_size, st.st_mtime_ns)
            )
    return out


def _cache_file(cache_dir: Path, name: str, root: Path, params: dict[str, Any], fp: str) -> Path:
    """``<name>-<hash(name, root, params)>-<fingerprint>.pt``: one source, one prefix."""
    ident = json.dumps([CACHE_FORMAT, name, str(root), params], sort_keys=True, default=str)
    prefix = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return cache_dir / f"{name}-{prefix}-{fp[:16]}.pt"


def _read_cache(path: Path) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return Dataset(**blob)
    except Exception as exc:  # a truncated or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


def _write_cache(path: Path, ds: Dataset) -> None:
    """Save atomically (temp file + os.replace) and drop stale versions of this source."""
    blob = {
        "name": ds.name,
        "x_train": ds.x_train,
        "y_train": ds.y_train,
        "x_test": ds.x_test,
        "y_test": ds.y_test,
        "classes": list(ds.classes),
        "mean": tuple(ds.mean),
        "std": tuple(ds.std),
        "max_value": ds.max_value,
        "vocab_size": ds.vocab_size,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is ordinary user data
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only cache should not stop the run
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=3)
        return
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def cached_dataset(
    cache_dir: Path,
    name: str,
    root: Path,
    params: dict[str, Any],
    fingerprint: Callable[[], str | None],
    build: Callable[[], Dataset],
) -> Dataset:
    """Return the cached dataset for the current source fingerprint, or build and cache it.

    ``fingerprint`` returns None when the source is not there yet (before a download); it
    is then called again after ``build``.
    """
    fp = fingerprint()
    if fp is not None:
        hit = _read_cache(_cache_file(cache_dir, name, root, params, fp))
        if hit is not None:
            return hit
    ds = build()
    fp = fingerprint()
    if fp is not None:
        _write_cache(_cache_file(cache_dir, name, root, params, fp), ds)
    return ds


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


# ----------------------------------------------------------------------- synthetic


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
        files = _stat_tree(src) if src.is_dir() else []
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


# --------------------------------------------------------------------- imagefolder

_READ_MODES = ("auto", "rgb", "gray")


def decode_images(paths: Sequence[Path], mode: str = "auto") -> list[torch.Tensor]:
    """Decode image files into uint8 ``[C, H, W]`` tensors.

    JPEGs are decoded in one batched ``decode_jpeg`` call, other formats with
    ``decode_image``. Files are read serially: on a local disk a thread pool was slower
    (GIL-bound on tiny files; benchmarks/README.md).

    Parameters
    ----------
    paths : sequence of Path
        Image files.
    mode : {"auto", "rgb", "gray"}
        ``"auto"`` keeps each file's channels; the others convert.

    Raises
    ------
    ValueError
        Naming the first file that cannot be decoded.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    read_mode = {
        "auto": ImageReadMode.UNCHANGED,
        "rgb": ImageReadMode.RGB,
        "gray": ImageReadMode.GRAY,
    }[mode]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not a
        # dependency; they still work, so keep the per-call warning out of users' logs.
        warnings.filterwarnings(
            "ignore",
            message=".*decoding and encoding capabilities of TorchVision",
            category=DeprecationWarning,
        )
        raw = [Path(p).read_bytes() for p in paths]
        blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
        out: list[torch.Tensor | None] = [None] * len(blobs)
        jpeg = [i for i, b in enumerate(raw) if b[:2] == b"\xff\xd8"]
        del raw
        if jpeg:
            try:
                decoded = decode_jpeg([blobs[i] for i in jpeg], mode=read_mode)
                for i, img in zip(jpeg, decoded, strict=True):
                    out[i] = img
            except RuntimeError:
                pass  # a bad file in the batch: the per-file pass below names it
        for i, blob in enumerate(blobs):
            if out[i] is None:
                try:
                    out[i] = decode_image(blob, mode=read_mode)
                except RuntimeError as exc:
                    raise ValueError(f"cannot decode image {paths[i]}: {exc}") from exc
    return out  # type: ignore[return-value]


def _scan_split(split_dir: Path) -> tuple[list[str], list[tuple[Path, int, int, int]]]:
    """Classes (sorted sub-directories) and ``(path, label, size, mtime_ns)`` per image."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder: missing directory {split_dir}; expected data-root/train/<class>/<image> "
            "and data-root/test/<class>/<image>"
        )
    classes = sorted(
        d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not classes:
        raise DatasetNotFoundError(f"imagefolder: no class directories in {split_dir}")
    files = []
    for label, cname in enumerate(classes):
        entries = sorted(
            (
                e
                for e in os.scandir(split_dir / cname)
                if e.is_file()
                and not e.name.startswith(".")
                and e.name.lower().endswith(IMAGE_EXTENSIONS)
            ),
            key=lambda e: e.name,
        )
        if not entries:
            raise ValueError(
                f"imagefolder: class directory {split_dir / cname} has no images "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        for e in entries:
            st = e.stat()
            files.append((Path(e.path), label, st.st_size, st.st_mtime_ns))
    return classes, files


def _stack_images(files: list[tuple[Path, int, int, int]], mode: str) -> torch.Tensor:
    paths = [f[0] for f in files]
    images = decode_images(paths, mode)
    ref = images[0].shape
    for path, img in zip(paths, images, strict=True):
        if img.shape != ref:
            raise ValueError(
                f"imagefolder: all images must have one size; {path} is {tuple(img.shape)} "
                f"(C,H,W) but {paths[0]} is {tuple(ref)}"
                + (
                    "; resize them to one size first"
                    if img.shape[1:] != ref[1:]
                    else "; convert them to one colour mode (all RGB or all grayscale) first"
                )
            )
    return torch.stack(images)


@DATASETS.register("imagefolder")
def _load_imagefolder(root: Path | None, cache_dir: Path, *, mode: str = "auto") -> Dataset:
    """Images in ``root/train/<class>/*`` and ``root/test/<class>/*``.

    Classes sorted alphabetically give the label order; train and test must hold the same
    classes and all images one size. ``mode`` ("auto", "rgb", "gray") sets the channels.
    """
    if root is None:
        raise DatasetNotFoundError(
            "dataset 'imagefolder' needs a folder (data-root in a config, root= in "
            "load_dataset) holding train/<class>/* and test/<class>/*"
        )
    if mode not in _READ_MODES:
        raise ValueError(f"mode must be one of {_READ_MODES}, got {mode!r}")
    given, root = root, root.resolve()
    if not root.is_dir():
        relative = "" if given.is_absolute() else f" (a relative data-root is from {Path.cwd()})"
        raise DatasetNotFoundError(f"imagefolder: data-root {root} does not exist{relative}")
    classes, train_files = _scan_split(root / "train")
    test_classes, test_files = _scan_split(root / "test")
    if test_classes != classes:
        diff = sorted(set(classes) ^ set(test_classes))
        raise ValueError(
            f"imagefolder: train and test must have the same class directories; differing: {diff}"
        )

    def fingerprint() -> str:
        return tree_fingerprint(
            [
                (str(p.relative_to(root)), size, mtime)
                for p, _, size, mtime in train_files + test_files
            ]
        )

    def build() -> Dataset:
        x_tr = _stack_images(train_files, mode)
        x_te = _stack_images(test_files, mode)
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise ValueError(
                f"imagefolder: train images are {tuple(x_tr.shape[1:])} but test images "
                f"{tuple(x_te.shape[1:])} (C,H,W); all images must have one size"
            )
        y_tr = torch.tensor([f[1] for f in train_files], dtype=torch.int64)
        y_te = torch.tensor([f[1] for f in test_files], dtype=torch.int64)
        return make_dataset("imagefolder", x_tr, y_tr, x_te, y_te, classes, 255.0)

    return cached_dataset(cache_dir, "imagefolder", root, {"mode": mode}, fingerprint, build)
