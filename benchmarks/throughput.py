"""python -m benchmarks.throughput: ACL layers vs nn.Conv2d, per backend, side by side.

Sections (``--sections``, all by default):

* layers: for every ResNet-18/34 conv shape x batch x dtype mode x memory format x pass
  (forward, backward, forward+backward), nn.Conv2d and every runnable backend with every layout
  (default mosaic, all-analytic) on the same input and upstream gradient: median time with its
  spread, ratio to nn.Conv2d and to the reference path, achieved TFLOP/s, peak memory,
  bytes saved for backward, forward error against torch's conv of the reference synthesis;
* synthesis: W = synthesize(akp, weight) and its backward alone, 64->64 3x3 default layout, float32;
* training: a whole SGD step of a ResNet-18 with ACL in every conv vs with nn.Conv2d (images/s).

Prints the rows as they are measured, then summary tables; writes CSV files, a Markdown report and
(if matplotlib is installed) a PNG plot into --out (default benchmarks/out/). Defaults per device
come from shapes.SWEEPS (``--quick``: the short sweep ``make run`` uses); flags override them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from acl_fused import dispatch

from .cases import (CONV2D, DTYPE_MODES, LAYOUTS, MEMORY_FORMATS, PASSES, REFERENCE, Impl, LayerBench, LayerCase,
                    SynthesisBench, first_line, implementations, ratio)
from .resnet import BLOCKS
from .shapes import SWEEPS, select_shapes
from .timing import TimerSettings, keep_freed_memory, peak_memory, saved_tensor_bytes, synchronize, time_side_by_side
from .training import TrainRow, measure_training

OUT_DIR = Path(__file__).resolve().parent / "out"
SECTIONS = ("layers", "synthesis", "training")
PASS_FLOPS = {"forward": 1, "backward": 2, "forward+backward": 3}   # x forward FLOPs (backward: dx and dW)


@dataclass
class LayerRow:
    device: str
    shape: str
    batch: int
    dtype: str
    memory_format: str
    pass_: str
    impl: str
    status: str                          # "ok", "not timed" or "error"
    note: str = ""
    median_ms: Optional[float] = None
    low_ms: Optional[float] = None
    high_ms: Optional[float] = None
    spread: str = ""
    vs_conv: Optional[float] = None      # time / nn.Conv2d's time (same case and pass)
    vs_reference: Optional[float] = None  # time / the reference backend's time (same layout)
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None     # most allocated at once during one call, beyond what was before
    saved_mib: Optional[float] = None    # storages saved for backward by one forward
    rel_err: Optional[float] = None      # forward vs F.conv2d with the reference synthesis


@dataclass
class SynthesisRow:
    device: str
    case: str
    impl: str
    status: str
    note: str = ""
    median_ms: Optional[float] = None
    low_ms: Optional[float] = None
    high_ms: Optional[float] = None
    spread: str = ""
    vs_reference: Optional[float] = None


# -- measuring ---------------------------------------------------------------------------------

def measure_case(case: LayerCase, passes: list[str], impls: list[Impl], settings: TimerSettings,
                 log: Callable[[str], None]) -> list[LayerRow]:
    """Rows of every pass x implementation of one case, the implementations timed side by side."""
    rows: list[LayerRow] = []

    def row(impl: Impl, pass_name: str, status: str, **kw) -> LayerRow:
        return LayerRow(case.device.type, case.shape.name, case.batch, case.dtype, case.memory_format, pass_name,
                        impl.label, status, **kw)

    with case.mode.flags():
        bench = LayerBench(case)
        checks: dict[Impl, tuple[float, float]] = {}
        failed: dict[Impl, tuple[str, str]] = {}
        for impl in impls:
            reason = bench.reason(impl)
            if reason:
                failed[impl] = ("not timed", reason)
                continue
            try:  # synchronised: a CUDA kernel's fault shows here, not in the next implementation's call
                checks[impl] = (bench.relative_error(impl),
                                saved_tensor_bytes(bench.pass_fn(impl, "forward")) / 2**20)
                synchronize(case.device)
            except Exception as e:  # reported in the table, not hidden
                failed[impl] = ("error", first_line(e))
                log(f"{case.label} {impl.label}: error: {failed[impl][1]}")
        for pass_name in passes:
            fns = {}
            for impl in checks:
                try:
                    fns[impl] = bench.pass_fn(impl, pass_name)
                    fns[impl]()
                    synchronize(case.device)
                except Exception as e:
                    fns.pop(impl, None)
                    rows.append(row(impl, pass_name, "error", note=first_line(e)))
                    log(format_layer_row(rows[-1]))
            timings = time_side_by_side(fns, case.device, settings)
            memory = {}
            for impl, fn in fns.items():
                memory[impl] = peak_memory(fn, case.device, reset=bench.clear_grads)
            conv = timings.get(Impl(CONV2D))
            flops = case.shape.forward_flops(case.batch) * PASS_FLOPS[pass_name]
            for impl, t in timings.items():
                ref = timings.get(Impl(REFERENCE, impl.layout)) if impl.layout else None
                err, saved = checks[impl]
                rows.append(row(impl, pass_name, "ok", median_ms=t.median * 1e3, low_ms=t.low * 1e3,
                                high_ms=t.high * 1e3, spread=t.spread,
                                vs_conv=t.median / conv.median if conv else None,
                                vs_reference=t.median / ref.median if ref else None,
                                tflops=flops / t.median / 1e12,
                                peak_mib=None if memory[impl] is None else memory[impl] / 2**20,
                                saved_mib=saved, rel_err=err))
                log(format_layer_row(rows[-1]))
            rows += [row(impl, pass_name, status, note=note) for impl, (status, note) in failed.items()]
    return rows


def measure_synthesis(device: torch.device, backends: list[str], settings: TimerSettings,
                      log: Callable[[str], None]) -> list[SynthesisRow]:
    bench = SynthesisBench(device)
    failed: dict[str, SynthesisRow] = {}
    fns = {}
    for backend in backends:
        reason = bench.reason(backend)
        if reason:
            failed[backend] = SynthesisRow(device.type, bench.label, backend, "not timed", reason)
            continue
        try:
            fns[backend] = bench.fn(backend)
            fns[backend]()
        except Exception as e:  # reported in the table, not hidden
            fns.pop(backend, None)
            failed[backend] = SynthesisRow(device.type, bench.label, backend, "error", first_line(e))
    timings = time_side_by_side(fns, device, settings)
    ref = timings.get(REFERENCE)
    rows = []
    for backend in backends:
        if backend in failed:
            rows.append(failed[backend])
            continue
        t = timings[backend]
        rows.append(SynthesisRow(device.type, bench.label, backend, "ok", "", t.median * 1e3, t.low * 1e3,
                                 t.high * 1e3, t.spread, t.median / ref.median if ref else None))
    for r in rows:
        log(f"{r.case} {r.impl:<13} " + (f"{r.status}: {r.note}" if r.status != "ok" else
            f"{r.median_ms:9.3f} ms [{r.low_ms:.3f}, {r.high_ms:.3f}]"
            + (f"  {r.vs_reference:6.3f}x reference" if r.vs_reference else "")))
    return rows


def format_layer_row(r: LayerRow) -> str:
    head = f"{r.device} {r.shape:<14} b{r.batch:<3} {r.dtype} {r.memory_format:<13} {r.pass_:<16} {r.impl:<21}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.note}"
    ref = f"{r.vs_reference:6.2f}x ref" if r.vs_reference is not None else " " * 10
    mem = f"  peak {r.peak_mib:8.1f} MiB" if r.peak_mib is not None else ""
    return (f"{head} {r.median_ms:9.3f} ms [{r.low_ms:.3f}, {r.high_ms:.3f}] {ratio(r.vs_conv, 6)} conv {ref}  "
            f"saved {r.saved_mib:7.2f} MiB  err {r.rel_err:.1e}{mem}")


# -- reporting ---------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit(repo: Path) -> str:
    """HEAD's short hash, "+ uncommitted changes" where tracked files differ from it (numbers from
    an edited tree are not that commit's), "unknown" without git or a repository."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else commit
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def autotuning() -> str:
    fused = dispatch.backend_module("triton_fused")
    if fused is None:
        return "n/a (triton_fused not importable)"
    return "on" if fused.AUTOTUNE else "off (ACL_FUSED_AUTOTUNE=0: each kernel's first candidate)"


def environment(device: torch.device, argv: list[str], settings: TimerSettings,
                script: str = "benchmarks.throughput") -> dict[str, str]:
    """The run's description for a report: device, date, versions, commit, the command (``python -m
    script argv``), timing settings, load."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
    commit = git_commit(Path(__file__).parent)
    timer = (f"CUDA events, warm-up {settings.cuda_warmup_ms:g} ms, {settings.cuda_rep_ms:g} ms of calls, "
             f"L2 flushed before each call (not in training steps): {settings.flush_l2}, "
             f"cudnn.benchmark: {torch.backends.cudnn.benchmark}"
             if device.type == "cuda" else
             f"torch.utils.benchmark blocked_autorange, {settings.cpu_min_run_time:g} s per implementation")
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": f"torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}",
        "git commit": commit,
        "command": " ".join(["python", "-m", script, *(shlex.quote(a) for a in argv)]),
        "timing": f"{timer}, {settings.rounds} interleaved rounds; medians",
        "triton_fused autotuning": autotuning(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pivot(rows: list[LayerRow], key: Callable[[LayerRow], tuple], key_names: list[str],
          cell: Callable[[LayerRow], str]) -> str:
    """One table row per ``key`` value, one column per implementation (in first-seen order)."""
    columns = list(dict.fromkeys(r.impl for r in rows))
    cells: dict[tuple, dict[str, str]] = defaultdict(dict)
    for r in rows:
        cells[key(r)][r.impl] = cell(r)
    return table(key_names + columns, ([str(k) for k in keys] + [c.get(col, "") for col in columns]
                                       for keys, c in cells.items()))


def geometric_mean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def summary(rows: list[LayerRow]) -> str:
    """Per dtype and pass: geometric mean over cases of time / nn.Conv2d, and how often each ACL
    implementation was the fastest backend for its layout (the data an auto rule comes from)."""
    ok = [r for r in rows if r.status == "ok"]
    ratios: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    fastest: dict[tuple, LayerRow] = {}
    for r in ok:
        if r.vs_conv is not None:  # None: nn.Conv2d's row of the case was not timed
            ratios[(r.dtype, r.pass_)][r.impl].append(r.vs_conv)
        if "/" in r.impl:
            k = (r.shape, r.batch, r.dtype, r.memory_format, r.pass_, r.impl.split("/")[1])
            if k not in fastest or r.median_ms < fastest[k].median_ms:
                fastest[k] = r
    wins: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for k, r in fastest.items():
        wins[(k[2], k[4])][r.impl] += 1
    impls = list(dict.fromkeys(r.impl for r in ok))
    return table(["dtype", "pass"] + impls, (
        [dtype, pass_] + [f"{geometric_mean(per[i]):.2f}x" + (f" ({wins[(dtype, pass_)][i]} fastest)" if "/" in i else "")
                          if per.get(i) else "" for i in impls]
        for (dtype, pass_), per in ratios.items()))


def not_timed(rows: list) -> str:
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        if r.status != "ok":
            counts[(r.impl, r.status, r.note)] += 1
    return table(["implementation", "status", "reason", "rows"], ([i, s, n, str(c)] for (i, s, n), c in counts.items()))


def ms(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}"


def report_head(title: str, env: dict[str, str]) -> list[str]:
    """A Markdown report's first lines: its title on the device, then the run's description (environment)."""
    return [f"# {title}: {env['device']}", ""] + [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}"
                                                  for k, v in env.items()]


def markdown(env: dict[str, str], layers: list[LayerRow], synthesis: list[SynthesisRow], training: list[TrainRow]) -> str:
    out = report_head("acl_fused throughput", env)
    ok = [r for r in layers if r.status == "ok"]
    if ok:
        case_key = (lambda r: (r.shape, r.batch, r.dtype, r.memory_format, r.pass_))
        case_names = ["shape", "batch", "dtype", "format", "pass"]
        out += ["", "## Layers: median ms (time / nn.Conv2d)", "",
                "Shapes are `Cin-Cout k<kernel> s<stride> @ input size`, no bias. Lower is better.", "",
                pivot(ok, case_key, case_names, lambda r: f"{r.median_ms:.3f} ({ratio(r.vs_conv)})"),
                "", "## Layers: time / reference path, same layout", "",
                pivot([r for r in ok if r.vs_reference is not None], case_key, case_names,
                      lambda r: f"{r.vs_reference:.2f}x"),
                "", "## Summary: geometric mean of time / nn.Conv2d over the cases above", "",
                "(n fastest): cases where that backend was the fastest ACL backend for its layout.", "",
                summary(layers),
                "", "## Memory: MiB saved for backward by one forward (input and parameters included)", "",
                pivot([r for r in ok if r.pass_ == ok[0].pass_], lambda r: (r.shape, r.batch, r.dtype, r.memory_format),
                      case_names[:4], lambda r: f"{r.saved_mib:.2f}")]
        if any(r.peak_mib is not None for r in ok):
            out += ["", "## Memory: peak MiB allocated during one call beyond what was allocated before it", "",
                    pivot(ok, case_key, case_names, lambda r: f"{r.peak_mib:.2f}")]
            if any(r.impl.startswith("native/") and r.device == "cpu" for r in ok):
                out += ["", "native on the CPU keeps W in a buffer between calls (one per thread and dtype, the "
                        "size of the largest W it made), which its peaks do not count; where a backward's weight "
                        "gradient becomes that buffer, the old one's free counts (csrc/README.md)."]
        else:
            out += ["", "Peak memory: n/a here (neither allocator statistics nor the profiler's allocation record); "
                    "the saved-for-backward bytes above are the memory measure here."]
        out += ["", "## Forward error vs F.conv2d with the reference synthesis (max over cases)", "",
                table(["dtype"] + list(dict.fromkeys(r.impl for r in ok)),
                      ([d] + [f"{max((r.rel_err for r in ok if r.dtype == d and r.impl == i), default=0):.1e}"
                              for i in dict.fromkeys(r.impl for r in ok)]
                       for d in dict.fromkeys(r.dtype for r in ok)))]
    if any(r.status != "ok" for r in layers):
        out += ["", "## Layers not timed", "", not_timed(layers)]
    if synthesis:
        out += ["", f"## Synthesis alone (forward + backward): {synthesis[0].case}", "",
                table(["implementation", "median ms", "spread", "time / reference", "note"],
                      ([r.impl, ms(r.median_ms), f"{ms(r.low_ms)}-{ms(r.high_ms)} ({r.spread})" if r.status == "ok" else "",
                        "" if r.vs_reference is None else f"{r.vs_reference:.3f}x", r.note or r.status]
                       for r in synthesis))]
    if training:
        out += ["", "## Training step (SGD: forward + backward + optimizer), ACL (default layout) in every conv", "",
                table(["network", "image", "batch", "dtype", "format", "convs", "median ms", "images/s",
                       "time / nn.Conv2d", "peak MiB", "note"],
                      ([r.network, str(r.image_size), str(r.batch), r.dtype, r.memory_format, r.impl, ms(r.median_ms),
                        "" if r.images_per_s is None else f"{r.images_per_s:.1f}",
                        "" if r.vs_conv is None else f"{r.vs_conv:.2f}x",
                        "" if r.peak_mib is None else f"{r.peak_mib:.0f}", r.note]
                       for r in training))]
    return "\n".join(out) + "\n"


def write_csv(path: Path, rows: list) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(rows[0])])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)


def plot(path: Path, rows: list[LayerRow], title: str) -> Optional[str]:
    """Time / nn.Conv2d per case, one panel per dtype x pass. Returns why no plot was made, if so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no plot"
    ok = [r for r in rows if r.status == "ok" and r.impl != CONV2D]
    if not ok:
        return "nothing timed: no plot"
    dtypes, passes = list(dict.fromkeys(r.dtype for r in ok)), list(dict.fromkeys(r.pass_ for r in ok))
    fig, axes = plt.subplots(len(dtypes), len(passes), figsize=(6 * len(passes), 4 * len(dtypes)), squeeze=False)
    for (i, dtype), (j, pass_) in ((a, b) for a in enumerate(dtypes) for b in enumerate(passes)):
        ax = axes[i][j]
        panel = [r for r in ok if r.dtype == dtype and r.pass_ == pass_]
        cases = list(dict.fromkeys(f"{r.shape} b{r.batch} {r.memory_format}" for r in panel))
        for impl in dict.fromkeys(r.impl for r in panel):
            points = [(cases.index(f"{r.shape} b{r.batch} {r.memory_format}"), r.vs_conv) for r in panel
                      if r.impl == impl and r.vs_conv is not None]
            if not points:
                continue
            ax.plot(*zip(*points), marker="o", linestyle="", label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_title(f"{dtype} {pass_}")
        ax.set_ylabel("time / nn.Conv2d")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=90, fontsize=6)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- command line ------------------------------------------------------------------------------

def csv_list(choices: Optional[Iterable[str]] = None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items
    return parse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="the short sweep (make run): a few shapes, short timings")
    p.add_argument("--sections", type=csv_list(SECTIONS), default=list(SECTIONS), help=", ".join(SECTIONS))
    p.add_argument("--shapes", type=csv_list(), help="shape keys such as 64-64k3s1,3-64k7s2, or 'all'")
    p.add_argument("--image-size", type=int, help="ResNet input size the layer spatial sizes follow from")
    p.add_argument("--batches", type=csv_list(), help="e.g. 8,32,128")
    p.add_argument("--dtypes", type=csv_list(DTYPE_MODES), help="; ".join(f"{m.name}: {m.description}"
                                                                       for m in DTYPE_MODES.values()))
    p.add_argument("--passes", type=csv_list(PASSES), default=list(PASSES), help=", ".join(PASSES))
    p.add_argument("--memory-formats", type=csv_list(MEMORY_FORMATS), help=", ".join(MEMORY_FORMATS))
    p.add_argument("--layouts", type=csv_list(LAYOUTS), default=list(LAYOUTS), help=", ".join(LAYOUTS))
    p.add_argument("--backends", type=csv_list(dispatch.BACKENDS), default=list(dispatch.BACKENDS),
                   help="acl_fused backends (nn.Conv2d is always measured)")
    p.add_argument("--network", default="resnet18", choices=list(BLOCKS), help="training section's network")
    p.add_argument("--train-image-size", type=int)
    p.add_argument("--train-batch", type=int)
    p.add_argument("--min-run-time", type=float, help="CPU: seconds of timed blocks per implementation")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="CUDA warm-up per implementation")
    p.add_argument("--rep-ms", type=float, help="CUDA: milliseconds of timed calls per implementation")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: leave glibc's malloc as it is (default: keep freed memory, see benchmarks/timing.py)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="keep torch.backends.cudnn.benchmark off")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default benchmarks/out)")
    return p


class SweepStopped(BaseException):
    """A signal stopped the sweep (a BaseException: the per-implementation error handlers, which
    report an implementation's failure in its row, must not catch it)."""


def stop_sweep(signum: int, frame) -> None:
    # Once: timeout(1) signals the process and then its group, and a second SweepStopped raised
    # while the first unwinds would lose the report.
    signal.signal(signum, signal.SIG_IGN)
    raise SweepStopped(f"stopped by {signal.Signals(signum).name}")


def parse_device_args(parser: argparse.ArgumentParser, argv: Optional[list[str]]
                      ) -> tuple[list[str], argparse.Namespace, torch.device]:
    """(argv, its parsed arguments, their --device) for a benchmark script's main (argv: sys.argv[1:]
    by default); --device cuda without a CUDA device is a usage error."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return argv, args, device


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    argv, args, device = parse_device_args(parser, argv)
    sweep = SWEEPS[(device.type, args.quick)]
    try:
        shapes = select_shapes(None if args.shapes == ["all"] else (args.shapes or sweep.shapes),
                               args.image_size or sweep.image_size)
        batches = [int(b) for b in args.batches] if args.batches else list(sweep.batches)
    except ValueError as e:
        parser.error(str(e))
    dtypes = args.dtypes or list(sweep.dtypes)
    formats = args.memory_formats or list(sweep.memory_formats)
    settings = TimerSettings(cpu_min_run_time=args.min_run_time or (0.1 if args.quick else 0.3),
                             cuda_warmup_ms=args.warmup_ms, cuda_rep_ms=args.rep_ms or (30.0 if args.quick else 50.0),
                             rounds=args.rounds)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device, argv, settings)
    if device.type == "cpu":
        env["heap"] = "system default (--system-malloc)" if args.system_malloc else keep_freed_memory()
    for k, v in env.items():
        print(f"{k}: {v}")

    layers: list[LayerRow] = []
    synthesis: list[SynthesisRow] = []
    training: list[TrainRow] = []
    # A time limit (timeout's SIGTERM, as scripts/gpu_check.sh sets) stops the sweep, not the report:
    # what was measured is still written, and the report says where it stopped.
    signal.signal(signal.SIGTERM, stop_sweep)
    failed = False
    try:
        # Synthesis first: it takes seconds, the layers (triton_fused's first compiles) minutes.
        if "synthesis" in args.sections:
            print("\n== synthesis alone ==")
            synthesis = measure_synthesis(device, args.backends, settings, print)
        if "layers" in args.sections:
            impls = implementations(args.backends, args.layouts)
            print(f"\n== layers: {len(shapes)} shapes x batches {batches} x {dtypes} x {formats} x {args.passes} ==")
            for shape in shapes:
                for batch in batches:
                    for dtype in dtypes:
                        for fmt in formats:
                            layers += measure_case(LayerCase(shape, batch, dtype, fmt, device), args.passes, impls,
                                                   settings, print)
        if "training" in args.sections:
            print("\n== training step ==")
            training = measure_training(device, args.network, args.train_image_size or sweep.train_image_size,
                                        args.train_batch or sweep.train_batch, dtypes, formats, args.backends,
                                        settings, print)
    except (SweepStopped, Exception) as e:  # an error outside a row's own checks (a CUDA fault) too
        failed = not isinstance(e, SweepStopped)
        if failed:
            traceback.print_exc()
        env["stopped"] = (f"{e if isinstance(e, SweepStopped) else first_line(e)}: the sweep is incomplete, "
                          "this report holds the cases measured before it")
        print(f"\n!! {env['stopped']}")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    env["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    args.out.mkdir(parents=True, exist_ok=True)
    stem = device.type + ("_quick" if args.quick else "")
    report = markdown(env, layers, synthesis, training)
    files = {f"layers_{stem}.csv": layers, f"synthesis_{stem}.csv": synthesis, f"training_{stem}.csv": training}
    for name, rows in files.items():
        write_csv(args.out / name, rows)
    (args.out / f"throughput_{stem}.md").write_text(report)
    print("\n" + report)
    why_no_plot = plot(args.out / f"throughput_{stem}.png", layers, env["device"]) if layers else "no layer rows: no plot"
    written = [n for n, rows in files.items() if rows] + [f"throughput_{stem}.md"] + (
        [] if why_no_plot else [f"throughput_{stem}.png"])
    print(f"wrote {', '.join(str(args.out / n) for n in written)}" + (f" ({why_no_plot})" if why_no_plot else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
