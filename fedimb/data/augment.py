"""On-device, vectorised data augmentation for batches of image tensors.

Client data stays resident on the training device, so augmentation runs there too, on
the whole batch at once: no per-sample Python loop and no host round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTED_DATASETS", "crop_flip", "default_augment", "random_crop_flip"]

# Datasets where crop + horizontal flip is the standard recipe. Not every 32x32 set:
# flipping digits (e.g. SVHN) changes what they show.
AUGMENTED_DATASETS = frozenset({"cifar10", "cifar100", "imagefolder"})


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip (p=0.5), per sample.

    Each output is the input shifted by ``(dy, dx)`` with ``dy, dx`` uniform in
    ``[-padding, padding]`` (pixels moved in from outside are 0), then mirrored left-right
    with probability 1/2. This equals torchvision's ``RandomCrop(H, padding)`` followed by
    ``RandomHorizontalFlip()``, drawn independently per sample but computed in one gather.

    Parameters
    ----------
    x : torch.Tensor
        Batch ``[N, C, H, W]`` of any dtype, on any device. Zero padding means black for
        raw images (as torchvision pads a PIL image) and the channel mean for normalised
        ones: fedimb's trainers crop the raw images, before normalising.
    generator : torch.Generator
        Source of the offsets and flips; may live on another device than ``x``.
    padding : int, default 4
        Largest shift in pixels (>= 0).

    Returns
    -------
    torch.Tensor
        New tensor, same shape, dtype and device as ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be a batch [N, C, H, W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n = x.shape[0]
    gdev = generator.device
    # Offsets are the crop corner in the padded image: 0..2*padding.
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    flip = torch.rand(n, generator=generator, device=gdev) < 0.5
    shift = torch.stack([dy, dx], dim=1).to(x.device)
    return crop_flip(x, shift, flip.to(x.device), padding)


def crop_flip(
    x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop each image of ``x`` from its zero-padded copy and mirror some, in one gather.

    The local trainers draw ``shift`` and ``flip`` in advance (per client and round, see
    :func:`fedimb.train.make_plan`) so that training one client alone or many at once
    sees the same augmentation.

    Parameters
    ----------
    x : torch.Tensor
        Batch ``[N, C, H, W]``.
    shift : torch.Tensor
        ``[N, 2]`` integer crop corners ``(dy, dx)`` in the padded image, in ``[0, 2*padding]``.
    flip : torch.Tensor
        ``[N]`` bool: mirror left-right after cropping.
    padding : int
        Zero padding on each side.
    """
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = shift[:, 0:1] + torch.arange(h, device=x.device)  # [N, H]
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + shift[:, 1:2]  # [N, W]
    # Flat index into each padded image; one gather does crop and flip together.
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)
    out = padded.reshape(n, c, hp * wp).gather(2, idx.expand(n, c, h * w))
    return out.reshape(n, c, h, w)


def default_augment(dataset_name: str, input_shape: Sequence[int]) -> bool:
    """Whether crop + flip is on by default: 32x32 images of CIFAR-like datasets.

    Parameters
    ----------
    dataset_name : str
        Registered dataset name.
    input_shape : sequence of int
        Shape of one sample, ``(C, H, W)`` for images.
    """
    shape = tuple(input_shape)
    return dataset_name in AUGMENTED_DATASETS and len(shape) == 3 and shape[1:] == (32, 32)
