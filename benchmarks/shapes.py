"""Convolution shapes and the sweeps (shapes x batches x dtypes x formats) the benchmarks run.

The shapes are read off the networks of benchmarks/resnet.py (traced on the meta device), so they
are exactly the convolutions ResNet-18 and ResNet-34 run for a given image size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from .resnet import BLOCKS, resnet


@dataclass(frozen=True)
class ConvShape:
    """One convolution: input [N, in_channels, height, width], square kernel, no bias, no groups.

    ``uses`` (not part of equality) counts how often each network runs this shape."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    height: int
    width: int
    uses: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        """Size-free name used on the command line, e.g. ``64-128k3s2``."""
        return f"{self.in_channels}-{self.out_channels}k{self.kernel}s{self.stride}"

    @property
    def name(self) -> str:
        return f"{self.key}@{self.height}"

    @property
    def output_hw(self) -> tuple[int, int]:
        def out(n: int) -> int:
            return (n + 2 * self.padding - self.kernel) // self.stride + 1
        return out(self.height), out(self.width)

    def forward_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the forward convolution (the backward pass costs twice that)."""
        h, w = self.output_hw
        return 2 * batch * self.out_channels * h * w * self.in_channels * self.kernel * self.kernel


def network_shapes(network: str, image_size: int) -> list[ConvShape]:
    """Every convolution of ``network`` (a key of resnet.BLOCKS) on image_size^2 images, in order."""
    model = resnet(BLOCKS[network]).to("meta").eval()   # eval: batch norm takes a 1x1 map of one image
    seen: list[ConvShape] = []

    def record(module: nn.Conv2d, inputs: tuple[torch.Tensor]) -> None:
        _, c, h, w = inputs[0].shape
        seen.append(ConvShape(c, module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0], h, w))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return seen


@lru_cache(maxsize=None)
def resnet_shapes(image_size: int = 224) -> tuple[ConvShape, ...]:
    """The distinct convolution shapes of ResNet-18 and ResNet-34 (first-use order), each with its
    use count per network."""
    counts: dict[ConvShape, dict[str, int]] = {}
    for network in BLOCKS:
        for s in network_shapes(network, image_size):
            per_net = counts.setdefault(s, {})
            per_net[network] = per_net.get(network, 0) + 1
    return tuple(ConvShape(**{**s.__dict__, "uses": tuple(sorted(n.items()))}) for s, n in counts.items())


def select_shapes(keys: Optional[list[str]], image_size: int) -> list[ConvShape]:
    """The ResNet shapes named by ``keys`` (ConvShape.key), or all of them for None."""
    shapes = resnet_shapes(image_size)
    if keys is None:
        return list(shapes)
    by_key = {s.key: s for s in shapes}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(by_key)}")
    return [by_key[k] for k in keys]


@dataclass(frozen=True)
class Sweep:
    """What ``python -m benchmarks.throughput`` runs by default on a device (flags override it)."""

    shapes: Optional[tuple[str, ...]]     # ConvShape keys; None: every ResNet-18/34 shape
    image_size: int                       # the ResNet input size the spatial sizes follow from
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]               # names in cases.DTYPE_MODES
    memory_formats: tuple[str, ...]       # names in cases.MEMORY_FORMATS
    train_image_size: int
    train_batch: int


#: A handful of shapes covering the stem, a 3x3 of each early stage, a strided 3x3 and a 1x1 projection.
CPU_SHAPES = ("3-64k7s2", "64-64k3s1", "64-128k3s2", "64-128k1s2", "128-128k3s1", "256-256k3s1")

SWEEPS: dict[tuple[str, bool], Sweep] = {
    # (device type, quick)
    ("cuda", False): Sweep(None, 224, (8, 32, 128), ("tf32", "fp32", "bf16"), ("nchw", "channels_last"), 224, 64),
    ("cuda", True): Sweep(("3-64k7s2", "64-64k3s1", "256-256k3s1"), 224, (32,), ("tf32", "bf16"),
                          ("nchw", "channels_last"), 224, 32),
    ("cpu", False): Sweep(CPU_SHAPES, 112, (4,), ("fp32",), ("nchw", "channels_last"), 64, 8),
    ("cpu", True): Sweep(("3-64k7s2", "64-64k3s1"), 64, (4,), ("fp32",), ("nchw",), 32, 4),
}
