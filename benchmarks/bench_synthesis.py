"""Synthesis alone, forward + backward (W = synthesize(akp, weight); W.backward(random grad)), per
backend, for a 64->64 3x3 default-layout layer in float32. SPEC §7's target: native >= 5x faster
than the reference here (read the ratio in the closing summary)."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from acl_fused import dispatch

from .cases import SynthesisBench, available_devices
from .timing import synchronized

DEVICES = available_devices()


@lru_cache(maxsize=None)
def synthesis_bench(device: torch.device) -> SynthesisBench:
    return SynthesisBench(device)


@pytest.mark.parametrize("backend", list(dispatch.BACKENDS))
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_synthesis(benchmark, device: torch.device, backend: str) -> None:
    bench = synthesis_bench(device)
    reason = bench.reason(backend)
    if reason:
        pytest.skip(reason)
    benchmark.group = bench.label
    benchmark.extra_info["impl"] = backend
    fn = synchronized(bench.fn(backend), device)
    fn()   # warm-up
    benchmark(fn)
