"""Seeded dropout: a client's masks depend on its own seed only, in either trainer.

``nn.Dropout`` draws its masks from torch's global generator: trained one client at a
time, a client's masks then depend on every draw before it, and under ``torch.func.vmap``
the draws of a whole group come from one call, so a client's masks would depend on
which clients share its group. Here each mask element is a hash of (the client's seed
from its plan, the step, the layer, the element's position in the batch), so one client
gets the same masks trained alone or in any group: the two trainers give the same
update up to float rounding, dropout or not. The masks are Bernoulli(1 - p) like
``nn.Dropout``'s (a counter-based generator, as Philox is), scaled by 1 / (1 - p).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _mix32_int(h: int) -> int:
    """:func:`_mix32` on a Python int."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def keep_mask(seed: torch.Tensor, salt: int, shape: torch.Size, p: float) -> torch.Tensor:
    """Float mask of ``shape``: 1 / (1 - p) with probability 1 - p, else 0.

    ``seed`` is a 0-d int64 tensor (a client's; vmapped in a group), ``salt`` the step
    and layer. Element i of a batch's row r has position r * row_size + i, so a batch
    padded with extra rows at its end gets the same masks on its real rows.
    """
    position = torch.arange(shape.numel(), device=seed.device, dtype=torch.int64)
    key = _mix32((seed & _M32) ^ salt)
    bits = _mix32((position * 0x9E3779B1 + key) & _M32)
    uniform = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in fp32
    return (uniform >= p).reshape(shape).to(torch.float32) / (1.0 - p)


class DropoutSeeds:
    """Where the seeded dropout layers read the current client's seed and step from."""

    def __init__(self) -> None:
        self.seed: torch.Tensor | None = None
        self.step = 0
        self.active = False
        """Whether the model has a seeded layer (else the seed need not be set)."""


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has an ``nn.Dropout`` layer (which :func:`seeded_dropout` seeds)."""
    return any(isinstance(m, nn.Dropout) for m in model.modules())


@contextlib.contextmanager
def seeded_dropout(model: nn.Module) -> Iterator[DropoutSeeds]:
    """Inside the block, ``model``'s ``nn.Dropout`` layers draw seeded masks.

    Set ``seeds.seed`` (the client's, or the group's stacked seeds inside vmap) and
    ``seeds.step`` before each forward pass. Layers with p = 0 or in eval mode pass
    their input through, as ``nn.Dropout`` does.
    """
    seeds = DropoutSeeds()
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    seeds.active = bool(layers)
    for index, layer in enumerate(layers):
        layer.forward = _seeded_forward(layer, index, seeds)  # an instance attribute
    try:
        yield seeds
    finally:
        for layer in layers:
            del layer.forward  # nn.Dropout's own again


def _seeded_forward(layer: nn.Dropout, index: int, seeds: DropoutSeeds):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not layer.training or layer.p == 0.0:
            return x
        if layer.p == 1.0:
            return torch.zeros_like(x)
        if seeds.seed is None:
            raise RuntimeError("seeded dropout: no client seed set for this forward pass")
        salt = _mix32_int((seeds.step * 0x01000193 + index * 0x9E3779B1 + 1) & _M32)
        return x * keep_mask(seeds.seed, salt, x.shape, layer.p).to(x.dtype)

    return forward
