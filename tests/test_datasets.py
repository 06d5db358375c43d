"""Datasets: digits, synthetic, imagefolder (+ cache), torchvision wrappers."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

import fedimb.data.datasets.images as images_module
from fedimb.data.datasets import Dataset, DatasetNotFoundError, list_datasets, load_dataset
from fedimb.registry import RegistryError

# The test writes its JPEGs with torchvision's (deprecated since 0.29) encoders.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_CANDIDATES = [
    Path("/work/shared/data/cifar10-jpeg"),
    REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg",
    REPO_ROOT / "shared" / "data" / "cifar10-jpeg",
]


# ---------------------------------------------------------------------------- digits


def test_registry_lists_all_datasets():
    assert set(list_datasets()) >= {
        "digits",
        "cifar10",
        "cifar100",
        "mnist",
        "fashion-mnist",
        "imagefolder",
        "synthetic",
    }


def test_digits_shapes_and_balanced_test_split():
    ds = load_dataset("digits")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape == (1797 - 300, 1, 8, 8)
    assert ds.x_test.shape == (300, 1, 8, 8)
    assert ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.max_value == 16
    assert int(ds.x_train.max()) == 16
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [30] * 10


def test_digits_train_and_test_partition_the_original_set():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = load_dataset("digits", test_per_class=20)

    def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
        return [
            bytes(xi.flatten().tolist()) + bytes([yi]) for xi, yi in zip(x, y.tolist(), strict=True)
        ]

    orig = sorted(
        bytes(im.astype(np.uint8).flatten().tolist()) + bytes([t])
        for im, t in zip(bunch.images, bunch.target.tolist(), strict=True)
    )
    # Same multiset as the original: no sample is in both splits and none is lost.
    assert sorted(rows(ds.x_train, ds.y_train) + rows(ds.x_test, ds.y_test)) == orig
    assert ds.x_test.shape[0] == 200


def test_digits_split_is_seeded():
    a, b = load_dataset("digits"), load_dataset("digits")
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_test, c.x_test)


def test_digits_bad_test_per_class():
    with pytest.raises(ValueError, match="test_per_class"):
        load_dataset("digits", test_per_class=0)
    with pytest.raises(ValueError, match="test_per_class"):
        load_dataset("digits", test_per_class=10_000)


def test_to_float_normalises_per_channel():
    ds = load_dataset("digits")
    z = ds.to_float(ds.x_train)
    assert z.dtype == torch.float32 and z.shape == ds.x_train.shape
    expected = (ds.x_train.double() / 16 - ds.x_train.double().mean() / 16) / (
        ds.x_train.double() / 16
    ).std(unbiased=False)
    torch.testing.assert_close(z.double(), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_separable():
    ds = load_dataset("synthetic", num_classes=4, samples_per_class=50, test_per_class=25, dim=8)
    assert ds.x_train.shape == (200, 8) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (100, 8) and ds.input_shape == (8,)
    assert torch.bincount(ds.y_train).tolist() == [50] * 4
    # A nearest-class-mean classifier fit on train should be nearly perfect on test.
    means = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(4)])
    pred = torch.cdist(ds.x_test, means).argmin(1)
    assert (pred == ds.y_test).float().mean() > 0.9
    z = ds.to_float(ds.x_train)
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


def test_synthetic_seeded():
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def test_unknown_dataset_and_param():
    with pytest.raises(RegistryError, match="digits"):
        load_dataset("cifar-11")
    with pytest.raises(ValueError, match="test_per_class"):
        load_dataset("digits", tests_per_class=3)


# ----------------------------------------------------------------------- imagefolder

CLASSES = ["bird", "ant", "cat"]  # written unsorted: labels must follow sorted names


def colour(label: int, i: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 20 * i, 200 - 30 * i)


def write_image(path: Path, rgb: tuple[int, int, int], size: int = 8, fmt: str = "jpg") -> None:
    img = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).contiguous()
    data = encode_jpeg(img, quality=95) if fmt == "jpg" else encode_png(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data.numpy()))


def make_tree(root: Path, per_class: dict[str, int] | None = None) -> Path:
    per_class = per_class or {"train": 4, "test": 2}
    for split, n in per_class.items():
        for name in CLASSES:
            label = sorted(CLASSES).index(name)
            for i in range(n):
                write_image(root / split / name / f"{i:03d}.jpg", colour(label, i))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls to the image decoder (one per split decoded)."""
    calls: list[int] = []
    real = images_module.decode_images

    def counting(paths, mode="auto"):
        calls.append(len(paths))
        return real(paths, mode)

    monkeypatch.setattr(images_module, "decode_images", counting)
    return calls


def test_imagefolder_loads_tree(tree: Path, tmp_path: Path):
    ds = load_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")
    assert ds.classes == ["ant", "bird", "cat"]
    assert ds.x_train.shape == (12, 3, 8, 8) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (6, 3, 8, 8)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.max_value == 255.0
    # Flat-colour JPEGs decode to (nearly) their colour; check against what we wrote.
    for x, y, i in zip(ds.x_train, ds.y_train.tolist(), [0, 1, 2, 3] * 3, strict=True):
        want = torch.tensor(colour(y, i), dtype=torch.float32).view(3, 1, 1)
        assert (x.float() - want).abs().max() <= 4


def test_imagefolder_cache_reused_then_rebuilt(tree: Path, tmp_path: Path, decode_calls):
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", tree, cache_dir=cache)
    assert decode_calls == [12, 6]
    second = load_dataset("imagefolder", tree, cache_dir=cache)
    assert decode_calls == [12, 6], "a second load must come from the cache"
    assert torch.equal(first.x_train, second.x_train) and second.classes == first.classes
    assert first.mean == second.mean
    assert len(list(cache.glob("*.pt"))) == 1
    assert not list(cache.glob("*.tmp")), "no temp file may be left behind"

    target = tree / "train" / "cat" / "000.jpg"
    write_image(target, (255, 255, 255))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load_dataset("imagefolder", tree, cache_dir=cache)
    assert decode_calls == [12, 6, 12, 6], "a changed file must trigger a rebuild"
    assert third.x_train[8].float().mean() > 250
    assert len(list(cache.glob("*.pt"))) == 1, "the stale cache file is replaced"


def test_imagefolder_unreadable_cache_is_rebuilt(tree: Path, tmp_path: Path, decode_calls):
    cache = tmp_path / "cache"
    load_dataset("imagefolder", tree, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        ds = load_dataset("imagefolder", tree, cache_dir=cache)
    assert len(decode_calls) == 4 and ds.x_train.shape[0] == 12


def test_imagefolder_mixed_formats(tmp_path: Path):
    root = make_tree(tmp_path / "tree")
    write_image(root / "train" / "ant" / "extra.png", (1, 2, 3), fmt="png")
    ds = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache")
    assert ds.x_train.shape[0] == 13
    # PNG is lossless: its pixels are exactly what was written.
    png = ds.x_train[4]  # sorted names: 000..003.jpg, then extra.png in class ant
    assert png[:, 0, 0].tolist() == [1, 2, 3] and ds.y_train[4] == 0


def test_imagefolder_size_mismatch_names_file(tree: Path, tmp_path: Path):
    bad = tree / "train" / "bird" / "002.jpg"
    write_image(bad, (0, 0, 0), size=9)
    with pytest.raises(ValueError, match=r"002\.jpg.*resize them to one size"):
        load_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")


def test_imagefolder_corrupt_file_names_file(tree: Path, tmp_path: Path):
    bad = tree / "test" / "cat" / "001.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match=r"cat.001\.jpg"):
        load_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")


def test_imagefolder_errors(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="root"):
        load_dataset("imagefolder", cache_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"does not exist$"):
        load_dataset("imagefolder", tmp_path / "nope", cache_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="a relative data-root is from /"):
        load_dataset("imagefolder", Path("no/such/tree"), cache_dir=tmp_path)
    root = make_tree(tmp_path / "t1", {"train": 2})
    with pytest.raises(DatasetNotFoundError, match="test"):
        load_dataset("imagefolder", root, cache_dir=tmp_path)
    root = make_tree(tmp_path / "t2")
    (root / "test" / "dog").mkdir()
    write_image(root / "test" / "dog" / "0.jpg", (0, 0, 0))
    with pytest.raises(ValueError, match="dog"):
        load_dataset("imagefolder", root, cache_dir=tmp_path)
    root = make_tree(tmp_path / "t3")
    (root / "train" / "dog").mkdir()
    (root / "test" / "dog").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset("imagefolder", root, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="mode"):
        load_dataset("imagefolder", make_tree(tmp_path / "t4"), cache_dir=tmp_path, mode="cmyk")


def find_cifar() -> Path | None:
    return next((p for p in CIFAR_CANDIDATES if (p / "train").is_dir()), None)


@pytest.mark.slow
@pytest.mark.skipif(find_cifar() is None, reason="shared cifar10-jpeg tree not present")
def test_shared_cifar10_jpeg_tree(tmp_path: Path):
    ds = load_dataset("imagefolder", find_cifar(), cache_dir=tmp_path)
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.y_train).tolist() == [5000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    assert 0.4 < ds.mean[0] < 0.6 and 0.2 < ds.std[0] < 0.3


# ----------------------------------------------------------------------- torchvision


class OfflineCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10 with no files and no network."""

    attempts: ClassVar[list[bool]] = []

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        OfflineCIFAR10.attempts.append(download)
        if not download:
            raise RuntimeError("Dataset not found or corrupted.")
        raise urllib.error.URLError("network is unreachable")


def test_torchvision_offline_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import torchvision.datasets

    OfflineCIFAR10.attempts = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(root / "cifar-10-batches-py") in msg and "imagefolder" in msg
    assert OfflineCIFAR10.attempts == [False, True]


def test_torchvision_default_root_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    monkeypatch.setenv("FEDIMB_DATA", str(tmp_path / "envdata"))
    with pytest.raises(DatasetNotFoundError, match="envdata"):
        load_dataset("cifar10", cache_dir=tmp_path / "cache")


def fake_mnist_class(constructed: list[bool]):
    """A 'downloading' MNIST: writes a raw file, serves random NHW uint8 tensors."""

    class FakeMNIST:
        classes: ClassVar[list[str]] = [f"{d} - digit" for d in range(10)]

        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            raw = Path(root) / "MNIST" / "raw"
            if not raw.is_dir():
                if not download:
                    raise RuntimeError("Dataset not found.")
                raw.mkdir(parents=True)
                (raw / "train-images-idx3-ubyte").write_bytes(b"x" * 10)
            constructed.append(train)
            g = torch.Generator().manual_seed(0 if train else 1)
            n = 30 if train else 10
            self.data = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    return FakeMNIST


def test_torchvision_conversion_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import torchvision.datasets

    constructed: list[bool] = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist_class(constructed))
    kwargs = {"cache_dir": tmp_path / "cache"}
    ds = load_dataset("mnist", tmp_path / "data", **kwargs)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.y_test.tolist() == list(range(10)) and ds.num_classes == 10
    g = torch.Generator().manual_seed(0)
    want = torch.randint(0, 256, (30, 28, 28), generator=g, dtype=torch.uint8)
    assert torch.equal(ds.x_train[:, 0], want)
    assert constructed == [True, False]  # train (after its download), then test
    again = load_dataset("mnist", tmp_path / "data", **kwargs)
    assert len(constructed) == 2, "second load must come from the cache"
    assert torch.equal(again.x_train, ds.x_train)


def test_cifar_layout_is_converted_to_nchw(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import torchvision.datasets

    class FakeCIFAR:
        classes: ClassVar[list[str]] = ["a", "b"]

        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            folder = Path(root) / "cifar-10-batches-py"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "batches.meta").write_bytes(b"m")
            self.data = np.arange(4 * 2 * 3 * 3, dtype=np.uint8).reshape(4, 2, 3, 3)
            self.targets = [0, 1, 0, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    ds = load_dataset("cifar10", tmp_path / "d", cache_dir=tmp_path / "c")
    src = np.arange(4 * 2 * 3 * 3, dtype=np.uint8).reshape(4, 2, 3, 3)
    assert ds.x_train.shape == (4, 3, 2, 3)
    assert int(ds.x_train[1, 2, 1, 0]) == int(src[1, 1, 0, 2])


def test_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="y_train"):
        Dataset(
            "x",
            torch.zeros(3, 2),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.int64),
            ["a"],
            (0.0,),
            (1.0,),
            1.0,
        )
