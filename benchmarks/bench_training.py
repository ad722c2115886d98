"""A whole SGD training step of a ResNet-18 with nn.Conv2d vs with AnalyticConv2d (default
layout, one backend) in every conv: image size, batch, dtype and format of the quick sweep."""
from __future__ import annotations

import pytest
import torch

from acl_fused import BackendUnavailable, dispatch

from .cases import CONV2D, DTYPE_MODES, available_devices, interpreted_triton, unavailable_reason
from .shapes import SWEEPS
from .timing import synchronized
from .training import train_step, training_batch

DEVICES = available_devices()
NETWORK = "resnet18"


@pytest.mark.parametrize("impl", [CONV2D, *dispatch.BACKENDS])
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_train_step(benchmark, device: torch.device, impl: str) -> None:
    reason = interpreted_triton(impl, device)
    if reason:
        pytest.skip(reason)
    sweep = SWEEPS[(device.type, True)]
    dtype, fmt = sweep.dtypes[0], sweep.memory_formats[0]
    images, labels = training_batch(device, sweep.train_batch, sweep.train_image_size, fmt)
    with DTYPE_MODES[dtype].flags():
        try:
            step, _ = train_step(impl, NETWORK, images, labels, dtype, fmt)
        except BackendUnavailable as e:
            pytest.skip(unavailable_reason(e, impl))
        benchmark.group = f"{device.type} train step {NETWORK} {sweep.train_image_size}px b{sweep.train_batch} {dtype} {fmt}"
        benchmark.extra_info["impl"] = impl
        benchmark(synchronized(step, device))
