"""Double backward's cost: steps with a gradient penalty, side by side, nn.Conv2d against
AnalyticConv2d (default layout) on each backend that runs here, one layer, the same input.

Steps (gradients reset each time): ``train`` (forward, backward: the first-order baseline), ``R1``
(the input gradient's squared norm, the gradient taken with create_graph, then backward through it:
GAN R1 / WGAN-GP style) and ``R1+params`` (the input's and the parameters' gradients penalised: the
second derivatives of synthesis too).

    python -m benchmarks.gradient_penalty [--device cpu] [--channels 64] [--size 28] [--batch 4]
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .one_layer import layers_to_time, make_parser, report, running, setting_up
from .throughput import parse_device_args
from .timing import time_side_by_side

STEPS = ("train", "R1", "R1+params")


def penalty_step(layer: nn.Module, x: torch.Tensor, step: str) -> Callable[[], None]:
    """One ``step`` (STEPS) of ``layer`` on ``x`` (which requires grad), gradients reset first."""
    params = list(layer.parameters())

    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        score = F.softplus(layer(x)).sum()
        if step == "train":
            score.backward()
            return
        wrt = [x] if step == "R1" else [x, *params]
        grads = torch.autograd.grad(score, wrt, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
    return run


def main(argv: Optional[list[str]] = None) -> int:
    argv, args, _ = parse_device_args(make_parser(__doc__, batch=4), argv)
    x, settings, heap = setting_up(args, requires_grad=True)
    layers, not_timed = layers_to_time(x)
    fns = {(impl, step): penalty_step(layer, x, step) for impl, layer in layers.items() for step in STEPS}
    fns, layers, not_timed = running(fns, layers, not_timed, x.device)
    timings = time_side_by_side(fns, x.device, settings)
    print(report("benchmarks.gradient_penalty", argv, x, settings, heap, "step",
                 STEPS, layers, not_timed, timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
