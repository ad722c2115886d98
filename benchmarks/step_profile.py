"""python -m benchmarks.step_profile: where a layer's forward + backward step spends its time, ACL
per backend next to nn.Conv2d, on the same tensors (the throughput sweep's forward+backward pass,
cases.LayerBench). Where a throughput target is missed this says what the time went to, as the
throughput issue asks: host overhead, synthesis, or the convolution's kernels.

Per implementation and step:

* wall ms: ``--steps`` steps, one synchronisation at the end (no profiler running);
* host ms: the same loop up to the return of its last call, before that synchronisation: what
  Python, the dispatcher and the launches take. On CUDA, where it exceeds the device's time, the
  step is host-bound (the kernels wait for their launches);
* device ms (CUDA): the kernels' time under torch.profiler, and the kernels that took the most
  (ms and launches a step); on CPU, the operators with the most self CPU time instead.

Its ratios come from a few steps in one pass: the throughput sweep (interleaved rounds, medians)
is the measure of time against nn.Conv2d. Writes ``step_profile_<device>.md`` into ``--out`` and
prints it.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from acl_fused import dispatch

from .cases import CONV2D, DTYPE_MODES, LAYOUTS, MEMORY_FORMATS, Impl, LayerBench, LayerCase, first_line, implementations
from .shapes import select_shapes
from .throughput import OUT_DIR, csv_list, environment, ms, parse_device_args, report_head, table
from .timing import TimerSettings, keep_freed_memory, synchronize

#: Per device: shapes (ConvShape keys), the ResNet input size their maps follow from, batch, dtype
#: mode, steps. CUDA: the quick sweep's shapes (Triton's disk cache has their kernels after it) and
#: the deepest 3x3, whose small maps make host overhead count most.
DEFAULTS = {
    "cuda": dict(shapes=("3-64k7s2", "64-64k3s1", "256-256k3s1", "512-512k3s1"), image_size=224, batch=32,
                 dtype="tf32", steps=20),
    "cpu": dict(shapes=("64-64k3s1", "64-128k1s2"), image_size=112, batch=4, dtype="fp32", steps=5),
}
TOP = 8  # kernels / operators listed per implementation
METHOD = ("wall and host ms: a loop of steps without the profiler, synchronised once at its end (host: up to the "
          "last call's return); device ms and the lists: the same steps under torch.profiler")


@dataclass
class StepProfile:
    impl: str
    status: str                       # "ok", "not timed" or "error"
    note: str = ""
    wall_ms: Optional[float] = None
    host_ms: Optional[float] = None
    device_ms: Optional[float] = None
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (name, ms a step, calls a step)


def profile_step(impl: str, step: Callable[[], None], device: torch.device, steps: int) -> StepProfile:
    """``step`` timed and profiled ``steps`` times after a warm-up."""
    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    issued = time.perf_counter()
    synchronize(device)
    end = time.perf_counter()
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = [e for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == on_device]

    def us(e) -> float:
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    events.sort(key=us, reverse=True)
    # Without CUPTI (a container without the permission) the profiler records no kernel: say so
    # rather than report a device time of 0.
    no_kernels = on_device and not events
    return StepProfile(impl, "ok", "torch.profiler recorded no CUDA kernel (CUPTI unavailable?)" if no_kernels else "",
                       wall_ms=(end - start) / steps * 1e3, host_ms=(issued - start) / steps * 1e3,
                       device_ms=sum(map(us, events)) / steps / 1e3 if on_device and events else None,
                       top=[(e.key, us(e) / steps / 1e3, e.count / steps) for e in events[:TOP]])


def profile_case(case: LayerCase, impls: list[Impl], steps: int, log: Callable[[str], None]) -> list[StepProfile]:
    rows = []
    with case.mode.flags():
        bench = LayerBench(case)
        for impl in impls:
            reason = bench.reason(impl)
            if reason:
                rows.append(StepProfile(impl.label, "not timed", reason))
                continue
            try:
                rows.append(profile_step(impl.label, bench.pass_fn(impl, "forward+backward"), case.device, steps))
            except Exception as e:  # reported in the table, not hidden
                rows.append(StepProfile(impl.label, "error", first_line(e)))
            r = rows[-1]
            if r.status != "ok":
                log(f"{case.label} {r.impl}: {r.status}: {r.note}")
                continue
            on_device = "" if r.device_ms is None else f", device {r.device_ms:.3f} ms"
            log(f"{case.label} {r.impl}: wall {r.wall_ms:.3f} ms, host {r.host_ms:.3f} ms{on_device}")
    return rows


def markdown(env: dict[str, str], cases: list[tuple[LayerCase, list[StepProfile]]]) -> str:
    out = report_head("acl_fused step profile", env)
    for case, rows in cases:
        conv = next((r for r in rows if r.impl == CONV2D and r.status == "ok"), None)
        out += ["", f"## {case.label} forward+backward", "",
                table(["implementation", "wall ms", "wall / nn.Conv2d", "host ms", "device ms", "note"],
                      ([r.impl, ms(r.wall_ms),
                        f"{r.wall_ms / conv.wall_ms:.2f}x" if conv and r.wall_ms is not None else "",
                        ms(r.host_ms), ms(r.device_ms), r.note] for r in rows))]
        what = "kernels by device time" if case.device.type == "cuda" else "operators by self CPU time"
        for r in rows:
            if r.top:
                out += ["", f"{r.impl}, {what} (ms a step, x calls a step):", ""]
                out += [f"- {t:.3f} ms, x{n:g}: `{name[:120]}`" for name, t, n in r.top]
    return "\n".join(out) + "\n"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", type=csv_list(), help="shape keys such as 64-64k3s1 (default: per device)")
    p.add_argument("--image-size", type=int, help="ResNet input size the layer spatial sizes follow from")
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", choices=list(DTYPE_MODES))
    p.add_argument("--memory-format", default="nchw", choices=list(MEMORY_FORMATS))
    p.add_argument("--layout", default="default", choices=list(LAYOUTS))
    p.add_argument("--backends", type=csv_list(dispatch.BACKENDS), default=list(dispatch.BACKENDS))
    p.add_argument("--steps", type=int, help="steps timed, and steps profiled")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default benchmarks/out)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    argv, args, device = parse_device_args(parser, argv)
    defaults = DEFAULTS[device.type]
    try:
        shapes = select_shapes(args.shapes or list(defaults["shapes"]), args.image_size or defaults["image_size"])
    except ValueError as e:
        parser.error(str(e))
    batch, dtype, steps = args.batch or defaults["batch"], args.dtype or defaults["dtype"], args.steps or defaults["steps"]
    torch.backends.cudnn.benchmark = True  # as the throughput sweep
    env = environment(device, argv, TimerSettings(), script="benchmarks.step_profile")
    env["timing"] = f"{METHOD}; {steps} steps"
    if device.type == "cpu":
        env["heap"] = keep_freed_memory()
    impls = implementations(args.backends, [args.layout])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step_profile_{device.type}.md"
    cases = []
    for shape in shapes:
        case = LayerCase(shape, batch, dtype, args.memory_format, device)
        cases.append((case, profile_case(case, impls, steps, print)))
        path.write_text(markdown(env, cases))  # after each case: a time limit leaves what was profiled
    report = markdown(env, cases)
    print("\n" + report + f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
