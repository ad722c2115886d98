"""Double backward's cost: steps with a gradient penalty, side by side, nn.Conv2d against
AnalyticConv2d (default layout) on each backend that runs here, one layer, the same input.

Steps (gradients reset each time): ``train`` (forward, backward: the first-order baseline), ``R1``
(the input gradient's squared norm, the gradient taken with create_graph, then backward through it:
GAN R1 / WGAN-GP style) and ``R1+params`` (the input's and the parameters' gradients penalised: the
second derivatives of synthesis too).

    python -m benchmarks.gradient_penalty [--device cpu] [--channels 64] [--size 28] [--batch 4]
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from acl_fused import AnalyticConv2d, dispatch
from acl_fused.conv_args import ConvArgs
from acl_fused.validation import make_problem

from .cases import CONV2D, untimed_reason
from .throughput import environment, table
from .timing import TimerSettings, keep_freed_memory, time_side_by_side

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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--channels", type=int, default=64, help="C_in = C_out of the 3x3 layer")
    p.add_argument("--size", type=int, default=28, help="input height = width")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--min-run-time", type=float, default=0.6, help="CPU: seconds of timed blocks per step")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    device = torch.device(args.device)
    heap = keep_freed_memory() if device.type == "cpu" else "n/a"
    settings = TimerSettings(cpu_min_run_time=args.min_run_time, rounds=args.rounds)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, requires_grad=True)
    layers: dict[str, nn.Module] = {CONV2D: nn.Conv2d(args.channels, args.channels, 3, padding=1, device=device)}
    not_timed = []
    for name in dispatch.BACKENDS:
        layer = AnalyticConv2d(args.channels, args.channels, 3, padding=1, backend=name, device=device)
        reason = untimed_reason(name, make_problem(layer.akp, layer.layout, layer.kernel_size, x,
                                                   ConvArgs.make(padding=1)))
        if reason is None:
            layers[name] = layer
        else:
            not_timed.append(f"{name}: not timed: {reason}")
    fns = {(impl, step): penalty_step(layer, x, step) for impl, layer in layers.items() for step in STEPS}
    timings = time_side_by_side(fns, device, settings)

    argv = sys.argv[1:] if argv is None else argv
    env = environment(device, argv, settings, script="benchmarks.gradient_penalty")
    print("\n".join(f"- {k}: {v}" for k, v in env.items()) + f"\n- heap: {heap}\n")
    print(f"3x3 {args.channels}->{args.channels} on [{args.batch}, {args.channels}, {args.size}, {args.size}], "
          "median ms (time / nn.Conv2d's same step)\n")
    rows = []
    for step in STEPS:
        base = timings[(CONV2D, step)].median
        rows.append([step] + [f"{timings[(impl, step)].median * 1e3:.2f} ({timings[(impl, step)].median / base:.2f}x)"
                              for impl in layers])
    print(table(["step", *layers], rows))
    for line in not_timed:
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
