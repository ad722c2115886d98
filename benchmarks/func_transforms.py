"""torch.func's transforms over one layer, side by side: nn.Conv2d against AnalyticConv2d (default
layout) on each backend that takes part in them here, the same input and parameters.

Transforms (of functional_call over the layer's parameters): ``per-sample grads`` (vmap of grad
over the batch, input [1, C, H, W] each), ``grad`` (of the batch's loss), ``ensemble`` (vmap of the
forward over 8 parameter sets: the layer's, scaled) and ``jvp`` (forward mode along the layer's
main parameter: ``akp`` for ACL, ``weight`` for nn.Conv2d).

    python -m benchmarks.func_transforms [--device cpu] [--channels 64] [--size 28] [--batch 8]
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from acl_fused import AnalyticConv2d

from .one_layer import layers_to_time, make_parser, report, running, setting_up
from .throughput import parse_device_args
from .timing import time_side_by_side

TRANSFORMS = ("per-sample grads", "grad", "ensemble", "jvp")
ENSEMBLE = 8


def transform_call(layer: nn.Module, x: torch.Tensor, transform: str) -> Callable[[], Any]:
    """One ``transform`` (TRANSFORMS) of ``layer`` on ``x``."""
    params = {k: v.detach() for k, v in layer.named_parameters()}
    main = "akp" if isinstance(layer, AnalyticConv2d) else "weight"

    def loss(p: dict, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, p, (inputs,)).square().sum()
    if transform == "per-sample grads":
        return lambda: vmap(grad(lambda p, sample: loss(p, sample.unsqueeze(0))), in_dims=(None, 0))(params, x)
    if transform == "grad":
        return lambda: grad(loss)(params, x)
    if transform == "ensemble":
        stacked = {k: torch.stack([v * (1 + i / ENSEMBLE) for i in range(ENSEMBLE)]) for k, v in params.items()}
        return lambda: vmap(lambda p: functional_call(layer, p, (x,)))(stacked)
    return lambda: jvp(lambda t: functional_call(layer, {**params, main: t}, (x,)), (params[main],), (params[main],))


def main(argv: Optional[list[str]] = None) -> int:
    argv, args, _ = parse_device_args(make_parser(__doc__, batch=8), argv)
    x, settings, heap = setting_up(args)
    layers, not_timed = layers_to_time(x, functorch=frozenset({"grad", "jvp", "vmap"}))
    fns = {(impl, t): transform_call(layer, x, t) for impl, layer in layers.items() for t in TRANSFORMS}
    with warnings.catch_warnings():  # torch's per-sample fallback, should a backend take it, warns every call
        warnings.simplefilter("ignore")
        fns, layers, not_timed = running(fns, layers, not_timed, x.device)
        timings = time_side_by_side(fns, x.device, settings)
    print(report("benchmarks.func_transforms", argv, x, settings, heap,
                 "transform", TRANSFORMS, layers, not_timed, timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
