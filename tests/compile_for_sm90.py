"""Compiles this project's Triton kernels for an H100 (sm_90a) with Triton's own GPU compiler (no
GPU needed) and prints a line per kernel: the registers a thread uses and the bytes it spills to
local memory (ptxas -v, the ptxas Triton compiles with). Triton's interpreter, which runs the
kernels in the tests, checks their Python, not the compiler's rules (dot operand types, branch
result types, float64 dots) nor register pressure. Run where TRITON_INTERPRET is unset:

    python tests/compile_for_sm90.py triton_fused X_DTYPE PARAM_DTYPE PRECISION KH KW [KH KW ...]
        the three kernels of the triton_fused backend, each with the first candidate it tunes
        over (the one it runs alone with ACL_FUSED_AUTOTUNE=0)
    python tests/compile_for_sm90.py triton PARAM_DTYPE GRAD_DTYPE KH KW [KH KW ...]
        the triton backend's synthesis and gradient kernels with the launch constants they run with

Dtypes are triton.language names (float32, bfloat16, ...); GRAD_DTYPE is the weight gradient's
(the convolution's: bfloat16 under autocast).
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from acl_fused.backends.triton_conv import _TORCH_TO_TL

SHORT = {tl.float16: "fp16", tl.bfloat16: "bf16", tl.float32: "fp32", tl.float64: "fp64", tl.int32: "i32"}
TORCH = {tl_dtype: dtype for dtype, tl_dtype in _TORCH_TO_TL.items()}


def compile_and_report(fn, pointers: dict, constexprs: dict, tag: str, num_warps: int, num_stages: int = 1) -> None:
    """Compiles JITFunction ``fn`` (pointer arguments typed by ``pointers``, other non-constexpr
    arguments int32) and prints ``compiled NAME TAG registers R spills S``."""
    signature = {name: "constexpr" if name in constexprs else
                 ("*" + SHORT[pointers[name]] if name.endswith("_ptr") else "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log).group(1)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    print("compiled", fn.__name__, tag, "registers", registers, "spills", spills, flush=True)


def triton_fused(x_dt, p_dt, precision: str, kernel_sizes: list[tuple[int, int]]) -> None:
    from acl_fused.backends import triton_conv as tc

    assert not tc.INTERPRETED
    synth = tl.float64 if p_dt == tl.float64 else tl.float32
    common = dict(SYNTH=synth, DOT=x_dt, ACC=tl.float64 if x_dt == tl.float64 else tl.float32, PRECISION=precision)
    kind = "full_precision" if x_dt == tl.float64 or precision == "ieee" and x_dt == tl.float32 else "tensor_core"
    param_tile = tc._param_tile(TORCH[p_dt])
    for (kh, kw), (kernel, flags) in itertools.product(kernel_sizes, [
            (tc._FORWARD_KERNELS[kind], dict(HAS_PLAIN=True, HAS_ANALYTIC=True, HAS_BIAS=True)),
            (tc._GRAD_INPUT_KERNELS[kind], dict(HAS_PLAIN=True, HAS_ANALYTIC=True)),
            (tc._conv_grad_params_kernel, dict(WANT_PLAIN=True, WANT_ANALYTIC=True, BLOCK_O=param_tile,
                                               BLOCK_C=param_tile))]):
        fn, config = kernel.fn, kernel.configs[0]  # the JITFunction under the autotuner, its first candidate
        pointers = {name: x_dt for name in fn.arg_names if name.endswith("_ptr")}
        pointers.update(family_ptr=tl.int32, row_ptr=tl.int32, akp_ptr=p_dt, weight_ptr=p_dt, gakp_ptr=synth,
                        gweight_ptr=synth)
        compile_and_report(fn, pointers, dict(common, KH=kh, KW=kw, **flags, **config.kwargs), f"{kh}x{kw}",
                           config.num_warps, config.num_stages)


def triton_synthesis(p_dt, grad_dt, kernel_sizes: list[tuple[int, int]]) -> None:
    from acl_fused.backends import triton_synthesis as ts

    assert not ts.INTERPRETED
    compute = tl.float64 if p_dt == tl.float64 else tl.float32  # ts._compute_akp: float32 for half parameters
    for kh, kw in kernel_sizes:
        for fn, tile, pointers, flags in [
                (ts._synthesize_kernel, ts._SYNTH_TILE, dict(weight_ptr=p_dt, w_ptr=p_dt), {}),
                (ts._akp_grad_kernel, ts._GRAD_TILE, dict(dw_ptr=grad_dt, d_akp_ptr=p_dt, d_weight_ptr=p_dt),
                 dict(STORE_AKP=True, STORE_WEIGHT=True))]:
            launch = ts.launch_constants((kh, kw), tile, TORCH[compute])
            num_warps = launch.pop("num_warps")
            compile_and_report(fn, dict(pointers, akp_ptr=compute, family_ptr=tl.int32, row_ptr=tl.int32),
                               dict(KH=kh, KW=kw, **launch, **flags), f"{kh}x{kw}", num_warps)


def kernel_sizes(numbers: list[str]) -> list[tuple[int, int]]:
    """KH KW [KH KW ...] as [(KH, KW), ...]."""
    sizes = [int(n) for n in numbers]
    return list(zip(sizes[::2], sizes[1::2]))


if __name__ == "__main__":
    backend, args = sys.argv[1], sys.argv[2:]
    if backend == "triton_fused":
        triton_fused(getattr(tl, args[0]), getattr(tl, args[1]), args[2], kernel_sizes(args[3:]))
    elif backend == "triton":
        triton_synthesis(getattr(tl, args[0]), getattr(tl, args[1]), kernel_sizes(args[2:]))
    else:
        sys.exit(f"unknown backend {backend!r}: triton_fused or triton")
