"""What the one-layer side-by-side scripts (gradient_penalty, func_transforms) share: nn.Conv2d and
AnalyticConv2d (default layout) on each backend that runs here, one 3x3 layer, and their report."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from acl_fused import AnalyticConv2d, dispatch
from acl_fused.conv_args import ConvArgs
from acl_fused.validation import make_problem

from .cases import CONV2D, first_line, untimed_reason
from .throughput import environment, table
from .timing import TimerSettings, Timing, keep_freed_memory, synchronize


def make_parser(doc: str, batch: int) -> argparse.ArgumentParser:
    """The scripts' options: device, the layer's channels, the input's size and batch, timing."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--channels", type=int, default=64, help="C_in = C_out of the 3x3 layer")
    p.add_argument("--size", type=int, default=28, help="input height = width")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--min-run-time", type=float, default=0.6, help="CPU: seconds of timed blocks per case")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    return p


def setting_up(args: argparse.Namespace, requires_grad: bool = False) -> tuple[torch.Tensor, TimerSettings, str]:
    """(the input x [batch, channels, size, size], seeded, the timer settings, the CPU heap's setting)."""
    device = torch.device(args.device)
    heap = keep_freed_memory() if device.type == "cpu" else "n/a"
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, requires_grad=requires_grad)
    return x, TimerSettings(cpu_min_run_time=args.min_run_time, rounds=args.rounds), heap


def layers_to_time(x: torch.Tensor, functorch: frozenset[str] = frozenset()
                   ) -> tuple[dict[str, nn.Module], list[str]]:
    """({implementation: C -> C 3x3 layer (padding 1) for x [N, C, H, W]}, why the backends left out
    are not timed), for calls made under the torch.func transforms ``functorch``."""
    channels = x.shape[1]
    layers: dict[str, nn.Module] = {CONV2D: nn.Conv2d(channels, channels, 3, padding=1, device=x.device)}
    not_timed = []
    for name in dispatch.BACKENDS:
        layer = AnalyticConv2d(channels, channels, 3, padding=1, backend=name, device=x.device)
        problem = make_problem(layer.akp, layer.layout, layer.kernel_size, x, ConvArgs.make(padding=1))
        reason = untimed_reason(name, dataclasses.replace(problem, functorch=functorch))
        if reason is None:
            layers[name] = layer
        else:
            not_timed.append(f"{name}: not timed: {reason}")
    return layers, not_timed


def running(fns: dict[tuple[str, str], Callable[[], object]], layers: dict[str, nn.Module], not_timed: list[str],
            device: torch.device) -> tuple[dict, dict[str, nn.Module], list[str]]:
    """(fns, layers, not_timed) without the implementations one of whose calls raises, each such
    named in not_timed with its error: every call runs once, synchronised, so that a CUDA kernel's
    fault shows at its own call (backends whose double backward or transforms never ran on a GPU)."""
    failed: dict[str, str] = {}
    for (impl, case), fn in fns.items():
        if impl in failed:
            continue
        try:
            fn()
            synchronize(device)
        except Exception as e:
            failed[impl] = f"{impl}: not timed: {case}: {first_line(e)}"
    return ({key: fn for key, fn in fns.items() if key[0] not in failed},
            {impl: layer for impl, layer in layers.items() if impl not in failed}, not_timed + list(failed.values()))


def report(script: str, argv: list[str], x: torch.Tensor, settings: TimerSettings, heap: str, what: str,
           cases: Sequence[str], layers: dict[str, nn.Module], not_timed: list[str],
           timings: dict[tuple[str, str], Timing]) -> str:
    """The run's description and one row per case (``what`` names them): median ms of each
    implementation (time / nn.Conv2d's same case)."""
    env = environment(x.device, argv, settings, script=script)
    n, c, h, w = x.shape
    rows = []
    for case in cases:
        base = timings[(CONV2D, case)].median
        rows.append([case] + [f"{timings[(impl, case)].median * 1e3:.2f} ({timings[(impl, case)].median / base:.2f}x)"
                              for impl in layers])
    return "\n".join([*(f"- {k}: {v}" for k, v in env.items()), f"- heap: {heap}", "",
                      f"3x3 {c}->{c} on [{n}, {c}, {h}, {w}], median ms (time / nn.Conv2d's same {what})", "",
                      table([what, *layers], rows), *(f"\n{line}" for line in not_timed)])
