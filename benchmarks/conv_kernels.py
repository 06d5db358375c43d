"""How fast one vectorised convolution step is, by how it is expressed: a kernel probe.

``torch.func.vmap`` turns a convolution over K clients' stacked weights into one grouped
convolution (groups = K). This times forward + backward (input and weight gradients) of
the 2-conv CNN's two convolutions for K clients at batch B each, expressed as:

- ``vmap``: ``vmap(grad(...))`` over stacked weights, as ``fedimb.batched`` does;
- ``grouped``: the same grouped convolution called directly, NCHW and channels-last;
- ``dense``: one model's convolution on the K*B images (same FLOPs, no groups): the limit;
- ``unfold``: each client's convolution as a matrix product over unfolded patches
  (``F.unfold`` + ``matmul``, batched over clients by ``vmap``: no grouped convolution);
- ``... weight grad``: ``vmap`` and ``unfold`` without the input's gradient, which the
  trainer never needs for the first layer (its input is data).

each in fp32 and bf16 autocast. Milliseconds per step, median of ``--repeats``.

    python benchmarks/conv_kernels.py --device cuda --clients 100 --out conv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fedimb.results import atomic_write_text

# (name, in channels, out channels, image side) of the CNN's convolutions (5x5, pad 2).
LAYERS = (("conv1", 3, 32, 32), ("conv2", 32, 64, 16))


def unfold_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=padding)`` (stride 1, no bias) as a matrix product
    over unfolded patches: [B, C_in, H, W] x [C_out, C_in, k, k] -> [B, C_out, H', W']."""
    k = weight.shape[-1]
    side_h = x.shape[-2] + 2 * padding - k + 1
    side_w = x.shape[-1] + 2 * padding - k + 1
    cols = F.unfold(x, kernel_size=k, padding=padding)  # [B, C_in * k * k, H' * W']
    return (weight.flatten(1) @ cols).unflatten(-1, (side_h, side_w))


def _time_ms(step: Any, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def layer_steps(
    k: int, b: int, c_in: int, c_out: int, side: int, device: torch.device, bf16: bool
) -> dict[str, Any]:
    """One step function per expression of this layer (name -> callable)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(k, b, c_in, side, side, device=device)
    w = torch.randn(k, c_out, c_in, 5, 5, device=device, requires_grad=True)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=bf16)

    def one_client(wk: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        with autocast():
            return F.conv2d(xk, wk, padding=2).float().square().mean()

    def one_client_unfold(wk: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        with autocast():
            return unfold_conv2d(xk, wk, padding=2).float().square().mean()

    per_client = vmap(grad(one_client, argnums=(0, 1)))  # both gradients, as the others
    per_client_unfold = vmap(grad(one_client_unfold, argnums=(0, 1)))
    weight_only = vmap(grad(one_client))
    weight_only_unfold = vmap(grad(one_client_unfold))

    def grouped(layout: torch.memory_format) -> Any:
        xg = x.transpose(0, 1).reshape(b, k * c_in, side, side).contiguous(memory_format=layout)
        xg.requires_grad_(True)

        def step() -> None:
            wg = w.reshape(k * c_out, c_in, 5, 5).contiguous(memory_format=layout)
            with autocast():
                out = F.conv2d(xg, wg, padding=2, groups=k)
            out.float().square().mean().backward()

        return step

    xd = x.reshape(k * b, c_in, side, side).clone().requires_grad_(True)
    wd = w[0].detach().clone().requires_grad_(True)

    def dense() -> None:
        with autocast():
            out = F.conv2d(xd, wd, padding=2)
        out.float().square().mean().backward()

    return {
        "vmap": lambda: per_client(w.detach(), x),
        "grouped": grouped(torch.contiguous_format),
        "grouped channels-last": grouped(torch.channels_last),
        "dense": dense,
        "unfold": lambda: per_client_unfold(w.detach(), x),
        "vmap weight grad": lambda: weight_only(w.detach(), x),
        "unfold weight grad": lambda: weight_only_unfold(w.detach(), x),
    }


def main(argv: list[str] | None = None) -> int:
    """Time every layer x expression x precision; print and optionally save as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "clients": args.clients,
        "batch_size": args.batch_size,
        "ms_per_step": {},
    }
    precisions = (False, True) if device.type == "cuda" else (False,)
    for name, c_in, c_out, side in LAYERS:
        for bf16 in precisions:
            steps = layer_steps(args.clients, args.batch_size, c_in, c_out, side, device, bf16)
            for label, step in steps.items():
                key = f"{name} {'bf16' if bf16 else 'fp32'} {label}"
                ms = _time_ms(step, device, args.repeats)
                report["ms_per_step"][key] = round(ms, 3)
                print(f"  {key:38} {ms:9.3f} ms", flush=True)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
