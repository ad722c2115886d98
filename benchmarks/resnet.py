"""The ResNet-18/34-style network (BasicBlocks, as torchvision builds it) that the benchmarks take
their convolution shapes from and whose training step they time.

Every convolution is made by a ``conv`` factory with nn.Conv2d's signature, so the same network is
built with ``nn.Conv2d`` or with ``AnalyticConv2d`` (any backend) in every conv.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

#: conv(in_channels, out_channels, kernel_size, stride=, padding=, bias=) -> module
ConvFactory = Callable[..., nn.Module]

BLOCKS: dict[str, tuple[int, ...]] = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    def __init__(self, conv: ConvFactory, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, padding=0, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + identity)


def resnet(blocks: Sequence[int], conv: ConvFactory = nn.Conv2d, num_classes: int = 10) -> nn.Sequential:
    """[N, 3, H, W] images -> [N, num_classes] logits: 7x7/2 stem, 3x3/2 max-pool, four stages of
    BasicBlocks (widths 64..512, the first block of stages 2-4 strided with a 1x1 projection)."""
    layers: list[nn.Module] = [conv(3, WIDTHS[0], 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(WIDTHS[0]),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    in_channels = WIDTHS[0]
    for stage, (n_blocks, width) in enumerate(zip(blocks, WIDTHS)):
        for b in range(n_blocks):
            layers.append(BasicBlock(conv, in_channels, width, stride=2 if stage > 0 and b == 0 else 1))
            in_channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)
