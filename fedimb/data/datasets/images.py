"""Image folders: a ``root/{train,test}/<class>/<image>`` tree, decoded in batches."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from fedimb.data.datasets.cache import cached_dataset, tree_fingerprint
from fedimb.data.datasets.core import DATASETS, Dataset, DatasetNotFoundError, make_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
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
