"""What the benchmarks run: dtype modes, layouts, passes, implementations, and the callables timed.

An *implementation* is ``nn.Conv2d`` (the baseline) or an acl_fused backend (every name in
``dispatch.BACKENDS``, so new backends are benchmarked without code changes) with a layout.
Everything one comparison needs (input, upstream gradient, the layers) is built once per case from
``torch.manual_seed(0)``, and every implementation is timed on the same tensors in the same process.
The nn.Conv2d baseline convolves with the very weight the default-layout ACL synthesizes.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from acl_fused import AnalyticConv2d, BackendUnavailable, Family, dispatch, synthesize
from acl_fused.conv_args import ConvArgs
from acl_fused.layout import LayoutSpec
from acl_fused.validation import Problem, make_problem

from .shapes import ConvShape

CONV2D = "nn.Conv2d"
REFERENCE = "reference"
CPU_TRITON_REASON = "interpreted Triton on CPU is a test tool, never timed"
PASSES = ("forward", "backward", "forward+backward")
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class DtypeMode:
    """Parameters stay float32. ``autocast_dtype``: the forward pass runs under torch.autocast with
    it (backward outside, as PyTorch recommends); ``tf32``: torch.backends.cudnn.allow_tf32 during
    the whole measurement."""

    name: str
    autocast_dtype: Optional[torch.dtype]
    tf32: bool
    cuda_only: bool
    description: str

    @contextlib.contextmanager
    def flags(self) -> Iterator[None]:
        allowed = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = allowed

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def why_not(self, device: torch.device) -> Optional[str]:
        if self.cuda_only and device.type != "cuda":
            return f"{self.name} ({self.description}) only differs from fp32 on CUDA"
        return None


DTYPE_MODES = {m.name: m for m in (
    DtypeMode("fp32", None, False, False, "float32, IEEE (cudnn.allow_tf32=False)"),
    DtypeMode("tf32", None, True, True, "float32 params, TF32 convolutions (cuDNN's default)"),
    DtypeMode("bf16", torch.bfloat16, True, False, "float32 params, bfloat16 autocast"),
)}


def available_devices() -> list[torch.device]:
    """CPU, and CUDA when there is a device."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def all_analytic(out_channels: int) -> dict[Family, int]:
    """Every channel analytic, spread evenly over the six analytic families (low codes get the rest)."""
    analytic = [f for f in Family if f != Family.PLAIN]
    base, extra = divmod(out_channels, len(analytic))
    return {f: base + (i < extra) for i, f in enumerate(analytic)}


#: layout name -> layout spec for C_out channels ("default": half plain, half analytic)
LAYOUTS: dict[str, Callable[[int], LayoutSpec]] = {"default": lambda c_out: None, "analytic": all_analytic}


class Impl(NamedTuple):
    """nn.Conv2d (layout None) or an acl_fused backend with a layout name."""

    backend: str
    layout: Optional[str] = None

    @property
    def label(self) -> str:
        return self.backend if self.layout is None else f"{self.backend}/{self.layout}"


def implementations(backends: Optional[list[str]] = None, layouts: Optional[list[str]] = None) -> list[Impl]:
    """nn.Conv2d first, then every backend (all registered ones by default) with every layout."""
    backends = list(dispatch.BACKENDS) if backends is None else backends
    unknown = [b for b in backends if b not in dispatch.BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; registered: {', '.join(dispatch.BACKENDS)}")
    return [Impl(CONV2D)] + [Impl(b, lay) for b in backends for lay in (layouts or list(LAYOUTS))]


def interpreted_triton(backend: str, device: torch.device) -> Optional[str]:
    """Triton backends are named ``triton*``; on CPU they could only run in Triton's interpreter."""
    return CPU_TRITON_REASON if device.type == "cpu" and backend.startswith("triton") else None


def untimed_reason(backend: str, problem: Problem) -> Optional[str]:
    """Why ``backend`` is not timed on ``problem`` (None: it is)."""
    return interpreted_triton(backend, problem.device) or dispatch.why_not(backend, problem)


def clear_grads(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def reference_weight(layer: AnalyticConv2d) -> torch.Tensor:
    """The layer's W [C_out, C_in/g, kH, kW] as the reference path synthesizes it."""
    return synthesize(layer.akp, layer.weight, layer.layout, layer.kernel_size, backend=REFERENCE)


@dataclass(frozen=True)
class LayerCase:
    shape: ConvShape
    batch: int
    dtype: str            # key of DTYPE_MODES
    memory_format: str    # key of MEMORY_FORMATS
    device: torch.device

    @property
    def mode(self) -> DtypeMode:
        return DTYPE_MODES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.device.type} {self.shape.name} b{self.batch} {self.dtype} {self.memory_format}"

    def group(self, pass_name: str) -> str:
        """pytest-benchmark group: everything compared side by side."""
        return f"{self.label} {pass_name}"


class LayerBench:
    """The tensors and layers of one LayerCase; ``pass_fn`` gives the callables to time.

    Build and use it inside ``case.mode.flags()``."""

    def __init__(self, case: LayerCase):
        self.case = case
        s, dev = case.shape, case.device
        fmt = MEMORY_FORMATS[case.memory_format]
        torch.manual_seed(0)
        self.x = torch.randn(case.batch, s.in_channels, s.height, s.width, device=dev).contiguous(
            memory_format=fmt).requires_grad_()
        self.layouts: dict[str, AnalyticConv2d] = {}
        for name, spec in LAYOUTS.items():
            self.layouts[name] = AnalyticConv2d(s.in_channels, s.out_channels, s.kernel, stride=s.stride,
                                               padding=s.padding, bias=False, layout=spec(s.out_channels),
                                               device=dev).to(memory_format=fmt)
        conv = nn.Conv2d(s.in_channels, s.out_channels, s.kernel, stride=s.stride, padding=s.padding, bias=False,
                         device=dev)
        with torch.no_grad():
            conv.weight.copy_(reference_weight(self.layouts["default"]))
        self.modules: dict[Impl, nn.Module] = {Impl(CONV2D): conv.to(memory_format=fmt)}
        with torch.no_grad():
            y = self.forward(conv)
        self.grad = torch.randn_like(y)
        self._expected: dict[str, torch.Tensor] = {}

    def forward(self, module: nn.Module) -> torch.Tensor:
        with self.case.mode.autocast(self.case.device):
            return module(self.x)

    def problem(self, layout: str) -> Problem:
        layer = self.layouts[layout]
        return make_problem(layer.akp, layer.layout, layer.kernel_size, self.x,
                            ConvArgs.make(layer.stride, layer.padding), self.case.mode.autocast_dtype)

    def reason(self, impl: Impl) -> Optional[str]:
        """Why ``impl`` is not timed here (None: it is)."""
        return self.case.mode.why_not(self.case.device) or (
            None if impl.layout is None else untimed_reason(impl.backend, self.problem(impl.layout)))

    def clear_grads(self) -> None:
        clear_grads([self.x, *(p for m in self.modules.values() for p in m.parameters())])

    def module(self, impl: Impl) -> nn.Module:
        """nn.Conv2d, or a copy of the layout's ACL layer (same parameter values) running ``impl.backend``."""
        if impl not in self.modules:
            layer = copy.deepcopy(self.layouts[impl.layout])
            layer.backend = impl.backend
            self.modules[impl] = layer
        return self.modules[impl]

    def pass_fn(self, impl: Impl, pass_name: str) -> Callable[[], Optional[torch.Tensor]]:
        """``forward``: y = layer(x) with autograd recording (as in training); ``backward``:
        y.backward(grad) through a graph built once (retain_graph); ``forward+backward``: both.
        Gradients are reset to None before every backward so none accumulates."""
        module, grad = self.module(impl), self.grad
        leaves = [self.x, *module.parameters()]
        if pass_name == "forward":
            return lambda: self.forward(module)
        if pass_name == "backward":
            y = self.forward(module)

            def backward() -> None:
                clear_grads(leaves)
                y.backward(grad, retain_graph=True)
            return backward
        if pass_name == "forward+backward":
            def forward_backward() -> None:
                clear_grads(leaves)
                self.forward(module).backward(grad)
            return forward_backward
        raise ValueError(f"unknown pass {pass_name!r}; known: {', '.join(PASSES)}")

    def relative_error(self, impl: Impl) -> float:
        """||y - y_expected|| / ||y_expected|| of the forward output, the expectation being torch's
        convolution with the reference synthesis of the same layout, in the same dtype mode."""
        layout = impl.layout or "default"
        with torch.no_grad():
            if layout not in self._expected:
                layer = self.layouts[layout]
                with self.case.mode.autocast(self.case.device):
                    expected = F.conv2d(self.x, reference_weight(layer), None, layer.stride, layer.padding)
                self._expected[layout] = expected.float()
            y = self.forward(self.module(impl)).float()
        expected = self._expected[layout]
        return ((y - expected).norm() / expected.norm()).item()


class SynthesisBench:
    """Synthesis alone, forward and backward: W = synthesize(akp, weight) then W.backward(grad W),
    for a 64->64 3x3 default-layout layer (SPEC §7: the fused paths must beat the reference here)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32,
                 in_channels: int = 64, out_channels: int = 64, kernel: int = 3):
        torch.manual_seed(0)
        self.device = device
        self.layer = AnalyticConv2d(in_channels, out_channels, kernel, bias=False, device=device, dtype=dtype)
        self.grad = torch.randn(out_channels, in_channels, kernel, kernel, device=device, dtype=dtype)

    @property
    def label(self) -> str:
        s = self.layer
        return (f"{self.device.type} synthesis {s.in_channels}->{s.out_channels} {s.kernel_size[0]}x{s.kernel_size[1]} "
                f"default {s.akp.dtype}".replace("torch.", ""))

    def reason(self, backend: str) -> Optional[str]:
        s = self.layer
        return untimed_reason(backend, make_problem(s.akp, s.layout, s.kernel_size))

    def fn(self, backend: str) -> Callable[[], None]:
        s, grad = self.layer, self.grad
        leaves = [t for t in (s.akp, s.weight) if t is not None]

        def run() -> None:
            clear_grads(leaves)
            synthesize(s.akp, s.weight, s.layout, s.kernel_size, backend=backend).backward(grad)
        return run


def first_line(error: BaseException) -> str:
    """A one-line description of an error for tables."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def ratio(value: Optional[float], width: int = 0) -> str:
    """A time ratio as "1.23x"; "n/a" where its baseline was not timed (an error, out of memory)."""
    return f"{'n/a':>{width + 1}}" if value is None else f"{value:{width}.2f}x"


def unavailable_reason(error: BackendUnavailable, backend: str) -> str:
    """``backend``'s own line of a BackendUnavailable message (it lists every backend's reason)."""
    prefix = f"{backend}: "
    for line in str(error).splitlines():
        if line.strip().startswith(prefix):
            return line.strip()[len(prefix):]
    return first_line(error)
