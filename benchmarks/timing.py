"""Timing and memory measurement shared by the throughput script and the pytest suites.

* CUDA: CUDA events around every call after a warm-up, the L2 cache flushed (a 256 MiB memset,
  outside the timed region, waited for so that it hides none of the call's host time) before every
  call, as ``triton.testing.do_bench`` flushes; median and 20/80 % quantiles. Implemented here rather than calling do_bench so the method does not change
  with the Triton version (or its absence).
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with every intra-op thread (the Timer's
  default is ONE thread), each round after a warm-up; median and interquartile range over the
  blocks.
* Peak memory: the most memory allocated at once during one call beyond what was allocated before
  it (outputs, saved tensors, gradients, workspaces). CUDA: ``torch.cuda.max_memory_allocated``.
  CPU, whose allocator keeps no statistics: the profiler's record of the call's allocations and
  frees (``profile_memory``), each with the running total of memory allocated while it records;
  memory allocated outside the allocator (oneDNN's scratchpads) is seen on neither side.
* CPU heap: :func:`keep_freed_memory` (the throughput script's default on CPU) makes glibc's malloc
  keep freed memory instead of returning it to the OS, as the jemalloc / tcmalloc setups of
  PyTorch's CPU performance guide do; otherwise a tensor of a few MiB is mapped afresh and
  faulted in page by page on some calls and not on others, depending on the allocation history.
* Saved-for-backward bytes (any device): the distinct storages autograd saves during a call, seen
  through ``torch.autograd.graph.saved_tensors_hooks`` (input and parameters included). Tensors a
  backend stashes on ``ctx`` as attributes bypass the hooks; CUDA peak memory still sees them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch.utils import benchmark


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the ``spread`` quantiles (low, high) around it."""

    median: float
    low: float
    high: float
    spread: str          # "q20-q80" (CUDA events) or "q25-q75" (CPU blocks)
    runs: int


@dataclass(frozen=True)
class TimerSettings:
    cpu_min_run_time: float = 0.3    # seconds of timed blocks per measurement
    cpu_warmup: int = 2              # untimed calls before each round (first-call caches, oneDNN primitives)
    cuda_warmup_ms: float = 10.0
    cuda_rep_ms: float = 50.0
    flush_l2: bool = True
    rounds: int = 3                  # interleaved rounds (time_side_by_side)


K = TypeVar("K")
_L2_FLUSH_BYTES = 256 * 1024 * 1024   # larger than the L2 of any current GPU (H100: 50 MiB)
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, for wall-clock timers (pytest-benchmark)."""
    def run() -> None:
        fn()
        synchronize(device)
    return run


def time_side_by_side(fns: dict[K, Callable[[], Any]], device: torch.device,
                      settings: TimerSettings = TimerSettings()) -> dict[K, Timing]:
    """Time every callable of ``fns`` on ``device`` (results discarded): all are warmed up, then
    timed in ``settings.rounds`` interleaved rounds (each a share of the time budget), so a load
    change on a shared machine hits every implementation alike; quantiles are over all rounds."""
    runners = {k: (_CudaRunner(fn, device, settings) if device.type == "cuda" else _CpuRunner(fn, settings))
               for k, fn in fns.items()}
    samples: dict[K, list[float]] = {k: [] for k in fns}
    for _ in range(settings.rounds):
        for k, runner in runners.items():
            samples[k] += runner.samples(1 / settings.rounds)
    return {k: _quantiles(s, *runners[k].spread) for k, s in samples.items()}


def _quantiles(seconds: list[float], low: float, high: float, spread: str) -> Timing:
    t = torch.tensor(seconds, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, low, high], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], spread, len(seconds))


class _CpuRunner:
    spread = (0.25, 0.75, "q25-q75")

    def __init__(self, fn: Callable[[], Any], settings: TimerSettings):
        self.fn, self.warmup = fn, settings.cpu_warmup
        self.timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        self.min_run_time = settings.cpu_min_run_time

    def samples(self, share: float) -> list[float]:
        """Per-call means of the timed blocks, after untimed warm-up calls: every round's blocks
        follow another implementation's, whose caches and heap they would otherwise inherit."""
        for _ in range(self.warmup):
            self.fn()
        return list(self.timer.blocked_autorange(min_run_time=self.min_run_time * share).times)


class _CudaRunner:
    spread = (0.2, 0.8, "q20-q80")

    def __init__(self, fn: Callable[[], Any], device: torch.device, settings: TimerSettings):
        self.fn, self.device, self.rep_ms = fn, device, settings.cuda_rep_ms
        self.flush = None
        if settings.flush_l2:
            self.flush = _flush_buffers.get(device)
            if self.flush is None:
                self.flush = _flush_buffers[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        self._one_call()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            self._one_call()
        end.record()
        torch.cuda.synchronize(device)
        self.estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(settings.cuda_warmup_ms / self.estimate_ms))):
            self._one_call()

    def _one_call(self) -> None:
        if self.flush is not None:
            self.flush.zero_()
        self.fn()

    def samples(self, share: float) -> list[float]:
        """Seconds of single calls between CUDA events (the flush stays outside the events). The
        host waits for the flush before it issues the call: else the flush (~75 us for 256 MiB on
        an H200) would hide that much of the call's host time (its Python, its launches), and only
        the host time beyond it would count."""
        n = min(max(3, int(self.rep_ms * share / self.estimate_ms)), 1000)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            if self.flush is not None:
                self.flush.zero_()
                torch.cuda.synchronize(self.device)
            s.record()
            self.fn()
            e.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


# glibc's mallopt parameters, and its largest mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory() -> str:
    """Set glibc's malloc to serve blocks up to 32 MiB from its heap and never trim the heap, so
    that freed memory is reused without page faults; what was done, for the run's report.
    Measured (2-vCPU EPYC VM, 1000 forward+backward steps of nn.Conv2d(256, 256, 3) on
    [4, 256, 7, 7]): 5.8 ms a step and 1.2 M page faults with glibc's defaults, 4.0 ms and 62 k
    (the start-up's) with these settings (as environment variables)."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        mallopt = None if libc is None else libc.mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "system default (no glibc mallopt here)"
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2**30)):
        return "system default (glibc refused mallopt)"
    return "glibc keeps freed memory (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB)"


def peak_memory(fn: Callable[[], Any], device: torch.device,
                reset: Callable[[], Any] = lambda: None) -> Optional[int]:
    """Bytes allocated at the peak of one ``fn()`` call beyond what was allocated before it (CUDA,
    CPU); None on other devices and where this torch's profiler cannot tell. ``reset()`` runs right
    before the call, outside the measurement: what it frees (the previous call's gradients, as a
    training step's zero_grad) counts neither in what was allocated before nor as freed during it."""
    if device.type == "cpu":
        return _cpu_peak_memory(fn, reset)
    if device.type != "cuda":
        return None
    reset()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# Kineto prints a line at every start and stop of the profiler (its "USDT" level, 5) unless its
# log level is above that; read when the profiler first starts.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


_MEASURED_CALL = "benchmarks.timing.peak_memory"


def _walk(events: list) -> Iterator:
    """The profiler's events and all their descendants."""
    stack = list(events)
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def _cpu_peak_memory(fn: Callable[[], Any], reset: Callable[[], Any]) -> Optional[int]:
    """peak_memory on the CPU: the profiler records every allocation and free made while it runs,
    each with the total allocated at that moment. It counts only what was allocated while it
    records (a block allocated before it started is never seen freed), so ``fn`` runs once inside
    it before the measured call: what that call keeps and the measured call frees then counts. The
    total before the measured call is its first event's total less that event's own size."""
    try:
        from torch._C._profiler import _EventType
    except ImportError:  # the profiler's event tree is not public API: absent, report n/a
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        reset()
        with torch.profiler.record_function(_MEASURED_CALL):
            fn()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    measured = next((e for e in _walk(tree) if e.name == _MEASURED_CALL), None)
    if measured is None:
        return None
    events = [e for e in _walk([measured])
              if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"]
    if not events:
        return 0
    events.sort(key=lambda e: e.start_time_ns)
    first = events[0].extra_fields
    before = first.total_allocated - first.alloc_size
    return max(0, max(e.extra_fields.total_allocated for e in events) - before)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
