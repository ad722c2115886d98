"""A whole training step (SGD, forward + backward + optimizer) of the ResNet of benchmarks/resnet.py
with nn.Conv2d in every conv against the same network with AnalyticConv2d (default layout) in every
conv, one network per backend; images/s, side by side, on the same batch.

``python -m benchmarks.throughput --sections training`` runs it alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from acl_fused import AnalyticConv2d, BackendUnavailable, dispatch

from .cases import CONV2D, DTYPE_MODES, MEMORY_FORMATS, first_line, interpreted_triton, ratio, unavailable_reason
from .resnet import BLOCKS, resnet
from .timing import TimerSettings, peak_memory, time_side_by_side

NUM_CLASSES = 10


@dataclass
class TrainRow:
    device: str
    network: str
    image_size: int
    batch: int
    dtype: str
    memory_format: str
    impl: str
    status: str                        # "ok", "not timed" or "error"
    note: str = ""
    median_ms: Optional[float] = None
    low_ms: Optional[float] = None
    high_ms: Optional[float] = None
    spread: str = ""
    images_per_s: Optional[float] = None
    vs_conv: Optional[float] = None    # step time / nn.Conv2d network's step time
    peak_mib: Optional[float] = None


def build_network(impl: str, network: str, device: torch.device, memory_format: str) -> nn.Module:
    """``network`` with nn.Conv2d (impl == CONV2D) or AnalyticConv2d(backend=impl) in every conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d if impl == CONV2D else functools.partial(AnalyticConv2d, backend=impl)
    return resnet(BLOCKS[network], conv, NUM_CLASSES).to(device=device, memory_format=MEMORY_FORMATS[memory_format])


def training_batch(device: torch.device, batch: int, image_size: int,
                   memory_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded images [batch, 3, image_size, image_size] and class labels [batch]."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=MEMORY_FORMATS[memory_format])
    return images, torch.randint(0, NUM_CLASSES, (batch,), device=device)


def train_step(impl: str, network: str, images: torch.Tensor, labels: torch.Tensor, dtype: str,
               memory_format: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, zero_grad): one SGD step (momentum 0.9) of a fresh ``network`` built for ``impl``:
    zero grads, forward (under autocast for low-precision modes), cross-entropy, backward (outside
    autocast), optimizer step; and its first part alone. Runs the step once before returning it,
    so a backend that cannot run some conv raises BackendUnavailable here. Call inside
    ``DTYPE_MODES[dtype].flags()``."""
    model = build_network(impl, network, images.device, memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    mode = DTYPE_MODES[dtype]

    def zero_grad() -> None:
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        zero_grad()
        with mode.autocast(images.device):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    step()
    return step, zero_grad


def measure_training(device: torch.device, network: str, image_size: int, batch: int, dtypes: list[str],
                     memory_formats: list[str], backends: Optional[list[str]] = None,
                     settings: TimerSettings = TimerSettings(), log: Callable[[str], None] = print) -> list[TrainRow]:
    """Training-step rows for nn.Conv2d and every backend (all registered ones by default)."""
    backends = list(dispatch.BACKENDS) if backends is None else backends
    settings = TimerSettings(**{**settings.__dict__, "flush_l2": False})   # a whole network, not one kernel
    rows: list[TrainRow] = []
    for dtype in dtypes:
        mode = DTYPE_MODES[dtype]
        for fmt in memory_formats:
            def row(impl: str, status: str, **kw) -> TrainRow:
                return TrainRow(device.type, network, image_size, batch, dtype, fmt, impl, status, **kw)

            if mode.why_not(device):
                rows += [row(impl, "not timed", note=mode.why_not(device)) for impl in [CONV2D, *backends]]
                continue
            images, labels = training_batch(device, batch, image_size, fmt)
            steps: dict[str, Callable[[], None]] = {}
            zero_grads: dict[str, Callable[[], None]] = {}
            skipped: dict[str, TrainRow] = {}
            with mode.flags():
                for impl in [CONV2D, *backends]:
                    reason = interpreted_triton(impl, device)
                    if reason:
                        skipped[impl] = row(impl, "not timed", note=reason)
                        continue
                    try:
                        steps[impl], zero_grads[impl] = train_step(impl, network, images, labels, dtype, fmt)
                    except BackendUnavailable as e:
                        skipped[impl] = row(impl, "not timed", note=unavailable_reason(e, impl))
                    except Exception as e:  # reported in the table, not hidden
                        skipped[impl] = row(impl, "error", note=first_line(e))
                timings = time_side_by_side(steps, device, settings)
                memory = {impl: peak_memory(step, device, reset=zero_grads[impl]) for impl, step in steps.items()}
            base = timings.get(CONV2D)
            for impl in [CONV2D, *backends]:
                if impl in skipped:
                    rows.append(skipped[impl])
                    continue
                t = timings[impl]
                rows.append(row(impl, "ok", median_ms=t.median * 1e3, low_ms=t.low * 1e3, high_ms=t.high * 1e3,
                                spread=t.spread, images_per_s=batch / t.median,
                                vs_conv=t.median / base.median if base else None,
                                peak_mib=None if memory[impl] is None else memory[impl] / 2**20))
                log(format_train_row(rows[-1]))
    return rows


def format_train_row(r: TrainRow) -> str:
    head = f"{r.device} {r.network} {r.image_size}px b{r.batch} {r.dtype} {r.memory_format} {r.impl:<13}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.note}"
    mem = "" if r.peak_mib is None else f"  peak {r.peak_mib:8.1f} MiB"
    return (f"{head} {r.median_ms:9.2f} ms [{r.low_ms:.2f}, {r.high_ms:.2f}]  {r.images_per_s:8.1f} img/s  "
            f"{ratio(r.vs_conv, 5)} nn.Conv2d{mem}")
