"""random_crop_flip against an explicit per-sample reference; default_augment."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedimb.data.augment import default_augment, random_crop_flip


def reference(x: torch.Tensor, dy: int, dx: int, flip: bool, padding: int) -> torch.Tensor:
    """One sample, the slow obvious way: zero-pad, crop at (dy, dx), maybe mirror."""
    c, h, w = x.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    padded[:, padding : padding + h, padding : padding + w] = x
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(-1) if flip else crop


def find_transform(x: torch.Tensor, y: torch.Tensor, padding: int) -> tuple[int, int, bool]:
    """The (dy, dx, flip) whose reference output equals ``y``; fails if there is none."""
    span = range(2 * padding + 1)
    for dy, dx, flip in itertools.product(span, span, (False, True)):
        if torch.equal(reference(x, dy, dx, flip, padding), y):
            return dy, dx, flip
    raise AssertionError("output is not a shifted/flipped copy of its input")


def batch(n: int = 64, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    # Strictly positive random values: any shift or flip gives a different image.
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 0.5


@pytest.mark.parametrize(("h", "w", "padding"), [(8, 8, 4), (5, 7, 2), (6, 6, 0)])
def test_each_output_is_a_shifted_flipped_copy(h, w, padding):
    x = batch(n=48, h=h, w=w)
    y = random_crop_flip(x, torch.Generator().manual_seed(1), padding=padding)
    assert y.shape == x.shape and y.dtype == x.dtype
    found = [find_transform(xi, yi, padding) for xi, yi in zip(x, y, strict=True)]
    if padding:
        # Shifts vary across samples rather than one shift for the whole batch.
        assert len({(dy, dx) for dy, dx, _ in found}) > 10


def test_shifts_cover_the_whole_range():
    x = batch(n=400, c=1, h=6, w=6)
    y = random_crop_flip(x, torch.Generator().manual_seed(2), padding=2)
    found = [find_transform(xi, yi, 2) for xi, yi in zip(x, y, strict=True)]
    assert {dy for dy, _, _ in found} == set(range(5))
    assert {dx for _, dx, _ in found} == set(range(5))


def test_flip_rate_is_about_half():
    x = batch(n=4000, c=1, h=2, w=3)
    y = random_crop_flip(x, torch.Generator().manual_seed(3), padding=0)
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all()), "padding=0: each output is x or its mirror"
    assert 0.46 < flipped.float().mean().item() < 0.54


def test_deterministic_per_generator_seed():
    x = batch()
    a = random_crop_flip(x, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, torch.Generator().manual_seed(5))
    c = random_crop_flip(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_input_unchanged_and_uint8_supported():
    x = (batch() * 100).to(torch.uint8)
    before = x.clone()
    y = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before) and y.dtype == torch.uint8
    find_transform(x[0], y[0], 4)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    random_crop_flip(batch(), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="x must be"):
        random_crop_flip(torch.zeros(3, 8, 8), g)
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.zeros(1, 3, 8, 8), g, padding=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_cpu_generator():
    x = batch()
    cpu = random_crop_flip(x, torch.Generator().manual_seed(7))
    gpu = random_crop_flip(x.cuda(), torch.Generator().manual_seed(7))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("cifar10", (3, 32, 32), True),
        ("cifar100", (3, 32, 32), True),
        ("imagefolder", (3, 32, 32), True),
        ("imagefolder", (3, 64, 64), False),
        ("mnist", (1, 28, 28), False),
        ("digits", (1, 8, 8), False),
        ("synthetic", (16,), False),
    ],
)
def test_default_augment(name, shape, expected):
    assert default_augment(name, shape) is expected


def test_trainer_crops_like_torchvision_randomcrop_then_normalize():
    """fedimb's trainer pads the raw image with black, as torchvision's
    ``RandomCrop(padding=4)`` on an image before ``Normalize`` (not with the channel mean)."""
    import numpy as np
    import torchvision.transforms.functional as TF

    from fedimb.data.datasets import make_dataset
    from fedimb.train import ClientJob, ClientPlan, TrainSettings, batch_inputs

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(6) % 2
    ds = make_dataset("t", images, labels, images, labels, ["a", "b"], 255.0)
    shift = np.array([[0, 0], [8, 8], [3, 5], [4, 4], [0, 8], [7, 1]])
    flip = np.array([False, True, False, True, True, False])
    plan = ClientPlan([np.arange(6)], [shift], [flip])
    job = ClientJob(images, labels, loss=lambda z, y: z.sum(), plan=plan)
    x, _ = batch_inputs(job, 0, ds.to_float, TrainSettings(augment=True, padding=4))
    for i in range(6):
        dy, dx = shift[i].tolist()
        ref = TF.crop(TF.pad(images[i], [4]), dy, dx, 32, 32)
        if flip[i]:
            ref = TF.hflip(ref)
        ref = TF.normalize(ref.float() / 255, list(ds.mean), list(ds.std))
        torch.testing.assert_close(x[i], ref)
    assert x[0, :, 0, 0].tolist() == pytest.approx(
        [-m / s for m, s in zip(ds.mean, ds.std, strict=True)]
    )
