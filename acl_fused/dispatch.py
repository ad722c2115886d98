"""Backend registry: the one place that lists backends and says why each can or cannot run.

Each backend is a module exposing

    why_not(problem: Problem) -> str | None      # None: can run; otherwise a readable reason
    synthesize(akp, weight, layout, kernel_size) -> W [C_out, Cg, kH, kW]
    conv2d(x, akp, weight, layout, bias, conv: ConvArgs, kernel_size) -> y
    bind_conv2d(layout, conv, kernel_size, device) -> f(x, akp, weight, bias) = conv2d(...)   (optional:
        conv2d without autocast, its other arguments prepared once, for a module's repeated calls)

called with inputs already validated by acl_fused.validation. Every backend module is imported
once, with acl_fused (so torch.compile traces dictionary lookups here, never an import); a backend
whose dependency is missing (triton, the compiled extension) reports that as its reason instead of
breaking ``import acl_fused``. ``backend="auto"`` takes the first backend of :func:`auto_order`
that has no reason (xformers-style).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

from .validation import COMPILED_TRANSFORM, Problem


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str
    summary: str
    #: the torch.func transforms (validation.Problem.functorch) its ops and autograd take part in
    functorch: frozenset[str] = frozenset()


#: Every backend, by name. Order here is only for listing; auto's order is auto_order().
BACKENDS: dict[str, BackendInfo] = {
    b.name: b for b in (
        BackendInfo("native", "acl_fused.backends.native",
                    "C++/CUDA torch.library ops: one-launch synthesis and AKP-gradient kernels "
                    "around ATen's convolution (oneDNN / cuDNN)",
                    # through torch.autograd.Functions (backends/native_transforms.py), whose forward-mode
                    # rules torch does not nest: a jvp inside a jvp reads them as zero
                    functorch=frozenset({"grad", "jvp", "vmap", "functionalize"})),
        BackendInfo("triton", "acl_fused.backends.triton_synthesis",
                    "Triton one-launch synthesis and AKP-gradient kernels around torch's convolution"),
        BackendInfo("triton_fused", "acl_fused.backends.triton_conv",
                    "Triton implicit-GEMM convolution that synthesizes its weight tiles in registers"),
        BackendInfo("reference", "acl_fused.backends.reference",
                    "pure PyTorch autograd (SPEC oracle): synthesis + torch conv2d",
                    functorch=frozenset({"grad", "jvp", "nested jvp", "vmap", "functionalize", COMPILED_TRANSFORM})),
    )
}


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run these inputs; the message lists every backend's reason."""


def _import(info: BackendInfo) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(info.module), None
    except Exception as e:  # missing optional dependency, unbuilt extension, incompatible version
        return None, f"cannot import {info.module}: {type(e).__name__}: {e}"


#: name -> (module, None) or (None, why it cannot be imported).
_LOADED = {name: _import(info) for name, info in BACKENDS.items()}


def why_not(name: str, problem: Problem) -> Optional[str]:
    """Why backend ``name`` cannot run ``problem`` (None when it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; known: {', '.join(BACKENDS)}"
    untaken = problem.functorch - BACKENDS[name].functorch
    if untaken:
        able = " and ".join(n for n in BACKENDS if n != name and _runs(n, problem)) or "no backend here"
        if COMPILED_TRANSFORM in untaken:
            return f"torch.compile is tracing a torch.func transform, which this backend cannot take part in; {able} can"
        return (f"torch.func's {' and '.join(sorted(untaken))} transform is running (grad: grad, vjp, jacrev; "
                f"jvp: forward-mode AD), which this backend cannot take part in; {able} can")
    module, reason = _LOADED[name]
    return reason if module is None else module.why_not(problem)


def _runs(name: str, problem: Problem) -> bool:
    """why_not(name, problem) is None, without composing the reasons."""
    module = _LOADED[name][0]
    return module is not None and problem.functorch <= BACKENDS[name].functorch and module.why_not(problem) is None


def report(problem: Problem) -> dict[str, Optional[str]]:
    """{backend name: reason it cannot run, or None} for every registered backend."""
    return {name: why_not(name, problem) for name in BACKENDS}


def auto_order(problem: Problem) -> list[str]:
    """Preference order for backend='auto' (fastest first); a backend that cannot run a call (a
    torch.func transform it does not take part in, BackendInfo.functorch, for one) is passed over.

    CPU: native, measured fastest in every case of the CPU sweep and under torch.func's transforms
    (benchmarks.func_transforms, 64->64 3x3 on [8, 64, 28, 28], 2 threads, float32, native time /
    the reference's: per-sample gradients 0.57x, grad 0.65x, an 8-model vmap ensemble 0.92x, jvp
    0.35x; benchmarks/RESULTS.md); the Triton interpreter is a correctness tool, never a fast path.
    CUDA: not measured yet (no GPU so far): native before triton because both run one synthesis
    launch around cuDNN and native launches from C++; triton_fused only when asked for, until a GPU
    sweep shows where it wins.
    """
    if problem.device.type == "cuda":
        return ["native", "triton", "reference"]
    return ["native", "reference"]


def select(name: str, problem: Problem) -> ModuleType:
    """The backend module to run ``problem`` with; BackendUnavailable (with reasons) otherwise."""
    return backend_module(select_name(name, problem))


def backend_module(name: str) -> ModuleType:
    """The module of a backend :func:`select_name` returned."""
    return _LOADED[name][0]


def select_name(name: str, problem: Problem) -> str:
    """The name of the backend to run ``problem`` with (``name`` itself, or auto's first that can
    run it); BackendUnavailable (with reasons) otherwise."""
    candidates = auto_order(problem) if name == "auto" else [name]
    for candidate in candidates:
        if why_not(candidate, problem) is None:
            return candidate
    names = list(BACKENDS) if name in BACKENDS or name == "auto" else [name, *BACKENDS]
    reasons = "\n".join(f"  {n}: {why_not(n, problem) or 'available'}" for n in names)
    wanted = "no backend can" if name == "auto" else f"backend {name!r} cannot"
    raise BackendUnavailable(f"{wanted} run this ACL call on {problem.device} / {problem.dtype}:\n{reasons}")
