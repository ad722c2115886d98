"""One ACL layer vs nn.Conv2d, per backend and layout, forward / backward / forward+backward.

Cases: the quick sweep of shapes.SWEEPS for each available device; group = case + pass."""
from __future__ import annotations

from functools import lru_cache

import pytest

from .cases import PASSES, Impl, LayerBench, LayerCase, available_devices, implementations
from .shapes import SWEEPS, select_shapes
from .timing import synchronized

DEVICES = available_devices()


def layer_cases() -> list[LayerCase]:
    cases = []
    for device in DEVICES:
        sweep = SWEEPS[(device.type, True)]
        cases += [LayerCase(shape, batch, dtype, fmt, device)
                  for shape in select_shapes(list(sweep.shapes), sweep.image_size) for batch in sweep.batches
                  for dtype in sweep.dtypes for fmt in sweep.memory_formats]
    return cases


@lru_cache(maxsize=1)
def layer_bench(case: LayerCase) -> LayerBench:
    with case.mode.flags():
        return LayerBench(case)


@pytest.mark.parametrize("case,pass_name,impl", [
    pytest.param(case, pass_name, impl, id=f"{case.group(pass_name)} {impl.label}".replace(" ", "-"))
    for case in layer_cases() for pass_name in PASSES for impl in implementations()])
def test_layer(benchmark, case: LayerCase, pass_name: str, impl: Impl) -> None:
    bench = layer_bench(case)
    reason = bench.reason(impl)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.group(pass_name)
    benchmark.extra_info["impl"] = impl.label
    with case.mode.flags():
        fn = synchronized(bench.pass_fn(impl, pass_name), case.device)
        fn()   # warm-up: first-call caches and autotuning stay out of the statistics
        benchmark(fn)
