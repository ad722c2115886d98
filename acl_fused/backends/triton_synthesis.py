"""The "triton" backend: one-launch synthesis and AKP-gradient kernels around torch's convolution.

Forward: ``_synthesize_kernel`` writes the whole mosaic W [C_out, Cg, kH, kW] (every family and
the plain rows) in one launch, then the library convolution (cuDNN / oneDNN through
library_conv) runs on it. Backward recomputes W (only x, akp and weight are saved, never W), gets
(grad_x, dW, grad_bias) from the library convolution backward, and ``_akp_grad_kernel`` turns dW
into d akp [A, Cg, 6] (the chain rule reduced over each kH*kW slice, exact zeros in unused slots)
and d weight for the plain rows, in one launch, without atomics or per-family intermediates.

Both kernels tile *slices*: slice s = o * Cg + c is the kH*kW kernel of output channel o, input
channel c, laid out as one row of a [BLOCK_S, KK_PAD] tile (KK_PAD = next power of two >= kH*kW).
The AKPs are loaded per slice as [BLOCK_S, 1] columns, so the positive maps and cos/sin(theta) are
computed once per slice; the formulas live in triton_families.py.

Precision: float64 and float32 parameters are synthesized in their own dtype; float16/bfloat16
parameters are synthesized in float32 (the host passes a float32 copy of akp, [A, Cg, 6], tiny)
and W is rounded once to their dtype. Under autocast x and bias are cast like nn.Conv2d does, W is
synthesized in the parameters' dtype and cast for the convolution. TF32: the library convolution
follows torch.backends.cudnn.allow_tf32 exactly as F.conv2d does; the kernels here never use
tl.dot. No Python float reaches a kernel (every constant is built in-kernel in the compute dtype),
so a caller or torch.compile passing float64 scalars cannot change the math.

Triton's ``@triton.jit`` decides at decoration time whether it compiles or interprets
(TRITON_INTERPRET=1), so the mode is read off the kernel object once, at import.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..conv_args import ConvArgs
from ..layout import Layout
from ..validation import Problem, conv_weight_format
from . import double_backward, library_conv
from .triton_families import PLAIN, family_value, family_value_and_grads, grid_xy, store_akp_grads

# Float32 elements per program tile ([BLOCK_S, KK_PAD]), 8 warps; float64 tiles hold half as many
# (a float64 value takes two registers). Not timed on hardware: tiles that compile for sm_90a
# without spilling registers to local memory (ptxas -v, kernel sizes 1x1 to 7x7, float32, bfloat16
# and float64, Triton 3.9 and 3.6: tests/compile_for_sm90.py), 39-98 registers a thread (the
# gradient keeps ~40 live values an element). With Triton 3.9, tiles of twice these at 4
# warps spilled 4-300 bytes a thread (the float32 1x1 kernels and every float64 kernel); these at
# 4 warps spilled 8 bytes in Triton 3.6's bfloat16 3x3 synthesis. The interpreter pays
# ~0.1-0.25 s per program whatever its size, so it gets one big tile.
_SYNTH_TILE = 512
_GRAD_TILE = 256
_NUM_WARPS = 8
_INTERPRETER_TILE = 1 << 14


@triton.jit
def _load_slices(akp_ptr, family_ptr, row_ptr, n_slices, CG, BLOCK_S: tl.constexpr):
    """For this program's BLOCK_S slices: (s, in range, input channel c, family code, row in
    akp/weight, raw AKPs a, p1..p5 as [BLOCK_S, 1] columns in akp's dtype, 0 for plain rows)."""
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = s < n_slices
    o = s // CG
    c = s - o * CG
    code = tl.load(family_ptr + o, mask=in_range, other=0)
    row = tl.load(row_ptr + o, mask=in_range, other=0).to(tl.int64)
    analytic = in_range & (code != PLAIN)
    p = akp_ptr + (row * CG + c) * 6  # akp [A, Cg, 6], contiguous
    a = tl.load(p + 0, mask=analytic, other=0)[:, None]
    p1 = tl.load(p + 1, mask=analytic, other=0)[:, None]
    p2 = tl.load(p + 2, mask=analytic, other=0)[:, None]
    p3 = tl.load(p + 3, mask=analytic, other=0)[:, None]
    p4 = tl.load(p + 4, mask=analytic, other=0)[:, None]
    p5 = tl.load(p + 5, mask=analytic, other=0)[:, None]
    return s, in_range, c, code, row, a, p1, p2, p3, p4, p5


@triton.jit
def _synthesize_kernel(akp_ptr, weight_ptr, family_ptr, row_ptr, w_ptr, n_slices, CG,
                       weight_s0, weight_s1, weight_s2, weight_s3,
                       KH: tl.constexpr, KW: tl.constexpr, KK_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """W[o, c] (contiguous [C_out, Cg, KH, KW], in w_ptr's dtype) = weight[row(o), c] for plain
    channels, K_family(akp[row(o), c]) otherwise; math in akp_ptr's dtype (float32/float64)."""
    s, in_range, c, code, row, a, p1, p2, p3, p4, p5 = _load_slices(
        akp_ptr, family_ptr, row_ptr, n_slices, CG, BLOCK_S)
    dtype = akp_ptr.dtype.element_ty
    kk = tl.arange(0, KK_PAD)
    i = kk // KW
    j = kk - i * KW
    x, y = grid_xy(i, j, KH, KW, dtype)
    inv_area = 1.0 / tl.full([], KH * KW, dtype)
    code2 = code[:, None]
    k = family_value(code2, a, p1, p2, p3, p4, p5, x[None, :], y[None, :], inv_area)
    in_kernel = (kk < KH * KW)[None, :]
    plain = (in_range & (code == PLAIN))[:, None] & in_kernel
    w_plain = tl.load(weight_ptr + (row * weight_s0 + c * weight_s1)[:, None]
                      + (i * weight_s2 + j * weight_s3)[None, :], mask=plain, other=0)
    value = tl.where(code2 == PLAIN, w_plain.to(dtype), k)
    tl.store(w_ptr + s[:, None] * (KH * KW) + kk[None, :], value.to(w_ptr.dtype.element_ty),
             mask=in_range[:, None] & in_kernel)


@triton.jit
def _akp_grad_kernel(akp_ptr, family_ptr, row_ptr, dw_ptr, d_akp_ptr, d_weight_ptr, n_slices, CG,
                     dw_s0, dw_s1, dw_s2, dw_s3,
                     KH: tl.constexpr, KW: tl.constexpr, KK_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                     STORE_AKP: tl.constexpr, STORE_WEIGHT: tl.constexpr):
    """From dW (any strides, any float dtype): d akp[row(o), c, :] = sum_ij dW[o, c] * dK/d akp
    (contiguous [A, Cg, 6], all six slots written, unused ones exactly 0) and d weight[row(o), c]
    = dW[o, c] for plain channels (contiguous [P, Cg, KH, KW]). Each slice owns its outputs."""
    s, in_range, c, code, row, a, p1, p2, p3, p4, p5 = _load_slices(
        akp_ptr, family_ptr, row_ptr, n_slices, CG, BLOCK_S)
    dtype = akp_ptr.dtype.element_ty
    kk = tl.arange(0, KK_PAD)
    i = kk // KW
    j = kk - i * KW
    in_kernel = (kk < KH * KW)[None, :]
    o = s // CG
    g = tl.load(dw_ptr + (o * dw_s0 + c * dw_s1)[:, None] + (i * dw_s2 + j * dw_s3)[None, :],
                mask=in_range[:, None] & in_kernel, other=0).to(dtype)
    if STORE_WEIGHT:
        plain = in_range & (code == PLAIN)
        tl.store(d_weight_ptr + (row * CG + c)[:, None] * (KH * KW) + kk[None, :],
                 g.to(d_weight_ptr.dtype.element_ty), mask=plain[:, None] & in_kernel)
    if STORE_AKP:
        x, y = grid_xy(i, j, KH, KW, dtype)
        inv_area = 1.0 / tl.full([], KH * KW, dtype)
        code2 = code[:, None]
        k, d_a, d_p1, d_p2, d_p3, d_p4, d_p5 = family_value_and_grads(
            code2, a, p1, p2, p3, p4, p5, x[None, :], y[None, :], inv_area)
        # padding columns hold g = 0 but a derivative that may overflow there: select, don't multiply
        g_a = tl.sum(tl.where(in_kernel, g * d_a, 0), axis=1)
        g_1 = tl.sum(tl.where(in_kernel, g * d_p1, 0), axis=1)
        g_2 = tl.sum(tl.where(in_kernel, g * d_p2, 0), axis=1)
        g_3 = tl.sum(tl.where(in_kernel, g * d_p3, 0), axis=1)
        g_4 = tl.sum(tl.where(in_kernel, g * d_p4, 0), axis=1)
        g_5 = tl.sum(tl.where(in_kernel, g * d_p5, 0), axis=1)
        store_akp_grads(d_akp_ptr + (row * CG + c) * 6, code, in_range & (code != PLAIN), g_a, g_1, g_2, g_3, g_4,
                        g_5)


#: True when the kernels were created under TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = type(_synthesize_kernel).__name__ == "InterpretedFunction"


def launches_kernels(fn):
    """For a function that launches Triton kernels on its first argument's device.

    Triton launches on the current CUDA device and its stream, so eagerly the call runs with that
    device made current (a layer on cuda:1 while cuda:0 is current would otherwise launch on
    cuda:0); torch.compile's generated code sets the device itself (Inductor's does; aot_eager's
    launches on the current device, as README.md says). torch.compile captures a launch
    as a kernel call only for compiled kernels on a GPU: an interpreted kernel would be traced as
    Python (the interpreter itself), so it stays eager."""
    if INTERPRETED:
        return torch.compiler.disable(fn)

    @functools.wraps(fn)
    def on_its_device(first: torch.Tensor, *args, **kwargs):
        if first.device.type != "cuda" or torch.compiler.is_compiling():
            return fn(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(first, *args, **kwargs)
    return on_its_device


_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _compute_akp(akp: torch.Tensor) -> torch.Tensor:
    """akp as the kernels read it: contiguous, float32 for half/bf16 (the compute dtype)."""
    if akp.dtype in (torch.float16, torch.bfloat16):
        return akp.float().contiguous()
    return akp.contiguous()


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the kernels store a result of ``dtype`` in. The interpreter's float32 -> bfloat16 cast
    truncates (GPUs round to nearest even), so interpreted kernels store float32 and torch rounds."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def launch_constants(kernel_size: tuple[int, int], tile: int, compute_dtype: torch.dtype) -> dict:
    """KK_PAD, BLOCK_S and num_warps of a launch whose program tile holds about ``tile`` float32
    elements (``_SYNTH_TILE`` or ``_GRAD_TILE``; half as many in float64, ``_INTERPRETER_TILE``
    when interpreted)."""
    if INTERPRETED:
        tile = _INTERPRETER_TILE
    elif compute_dtype == torch.float64:
        tile //= 2
    kk_pad = triton.next_power_of_2(kernel_size[0] * kernel_size[1])
    return dict(KK_PAD=kk_pad, BLOCK_S=max(1, tile // kk_pad), num_warps=_NUM_WARPS)


@launches_kernels
def synthesize_weight(akp: torch.Tensor, weight: Optional[torch.Tensor], family_i32: torch.Tensor,
                      row_i32: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """W [C_out, Cg, kH, kW] (contiguous, akp's dtype) in one launch; no autograd."""
    kh, kw = kernel_size
    c_out, cg = family_i32.shape[0], akp.shape[1]
    w = torch.empty((c_out, cg, kh, kw), dtype=_out_dtype(akp.dtype), device=akp.device)
    n_slices = c_out * cg
    if n_slices > 0:
        compute_akp = _compute_akp(akp)
        launch = launch_constants(kernel_size, _SYNTH_TILE, compute_akp.dtype)
        # without plain rows the weight pointer is never read: any valid pointer will do
        plain = w if weight is None else weight
        _synthesize_kernel[(triton.cdiv(n_slices, launch["BLOCK_S"]),)](
            compute_akp, plain, family_i32, row_i32, w, n_slices, cg, *plain.stride(), KH=kh, KW=kw, **launch)
    return w.to(akp.dtype)


@launches_kernels
def akp_and_weight_grads(grad_w: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor],
                         family_i32: torch.Tensor, row_i32: torch.Tensor, kernel_size: tuple[int, int],
                         need_akp: bool, need_weight: bool
                         ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(d akp [A, Cg, 6], d weight [P, Cg, kH, kW]) in the parameters' dtype from dW
    [C_out, Cg, kH, kW] (any strides and float dtype) in one launch; None where not needed."""
    need_weight = need_weight and weight is not None
    d_akp = torch.empty(akp.shape, dtype=_out_dtype(akp.dtype), device=akp.device) if need_akp else None
    d_weight = torch.empty(weight.shape, dtype=_out_dtype(weight.dtype), device=weight.device) if need_weight else None
    n_slices = family_i32.shape[0] * akp.shape[1]
    if n_slices > 0 and (need_akp or need_weight):
        compute_akp = _compute_akp(akp)
        launch = launch_constants(kernel_size, _GRAD_TILE, compute_akp.dtype)
        _akp_grad_kernel[(triton.cdiv(n_slices, launch["BLOCK_S"]),)](
            compute_akp, family_i32, row_i32, grad_w, grad_w if d_akp is None else d_akp,
            grad_w if d_weight is None else d_weight, n_slices, akp.shape[1], *grad_w.stride(),
            KH=kernel_size[0], KW=kernel_size[1], STORE_AKP=need_akp, STORE_WEIGHT=need_weight, **launch)
    return (None if d_akp is None else d_akp.to(akp.dtype),
            None if d_weight is None else d_weight.to(weight.dtype))


class TritonSynthesize(torch.autograd.Function):
    """W = synthesis(akp, weight); backward: one AKP-gradient launch. Saves akp, weight only."""

    @staticmethod
    def forward(ctx, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
                kernel_size: tuple[int, int]) -> torch.Tensor:
        idx = layout.tensors(akp.device)
        ctx.save_for_backward(akp, weight)
        ctx.layout, ctx.kernel_size = layout, kernel_size
        return synthesize_weight(akp, weight, idx["family_i32"], idx["row_i32"], kernel_size)

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        akp, weight = ctx.saved_tensors
        gradients_of = bound_synthesis_gradients(akp, weight, ctx.layout, ctx.kernel_size)
        return (*gradients_of(grad_w, ctx.needs_input_grad[0], ctx.needs_input_grad[1]), None, None)


class TritonConv2d(torch.autograd.Function):
    """y = conv2d(x, W, bias) with W synthesized in-kernel; backward recomputes W.

    Saves x, akp and weight; never W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], layout: Layout, conv: ConvArgs,
                kernel_size: tuple[int, int]) -> torch.Tensor:
        idx = layout.tensors(akp.device)
        w = synthesize_weight(akp, weight, idx["family_i32"], idx["row_i32"], kernel_size)
        ctx.save_for_backward(x, akp, weight)
        ctx.layout, ctx.conv, ctx.kernel_size = layout, conv, kernel_size
        return library_conv.conv_forward(x, w, bias, conv, conv_weight_format(x, weight))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, akp, weight = ctx.saved_tensors
        layout, kernel_size = ctx.layout, ctx.kernel_size
        grads = double_backward.conv2d_gradients(
            grad_y, x, akp, weight, bound_synthesis(layout, kernel_size),
            bound_synthesis_gradients(akp, weight, layout, kernel_size), ctx.conv, kernel_size, ctx.needs_input_grad)
        return (*grads, None, None, None)


# ---------------------------------------------------------------- backend protocol (dispatch.py)

def why_not(problem: Problem) -> Optional[str]:
    """None when the Triton kernels can run ``problem``, else why not."""
    if problem.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {problem.dtype} is not supported (float64, float32, float16, bfloat16)"
    device = problem.device.type
    if device == "cuda":
        return None
    if device == "cpu":
        if INTERPRETED:
            return None
        return ("Triton kernels run on CPU tensors only through Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing acl_fused (triton.jit picks the mode when the kernels are defined)")
    return f"device type {device!r} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"


def synthesize(akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
               kernel_size: tuple[int, int]) -> torch.Tensor:
    """W [C_out, Cg, kH, kW] in the parameters' dtype, differentiable w.r.t. akp and weight."""
    return TritonSynthesize.apply(akp, weight, layout, kernel_size)


def bound_synthesis(layout: Layout, kernel_size: tuple[int, int]) -> double_backward.Synthesize:
    """:func:`synthesize` as a function of (akp, weight)."""
    return lambda akp, weight: synthesize(akp, weight, layout, kernel_size)


def bound_synthesis_gradients(akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
                              kernel_size: tuple[int, int]) -> double_backward.SynthesisGradients:
    """The gradients of :func:`synthesize` (one launch) as a function of (grad_W, need_akp,
    need_weight), differentiable when the running backward records a graph."""
    idx = layout.tensors(akp.device)

    def gradients_of(grad_w: torch.Tensor, need_akp: bool, need_weight: bool):
        def first_order():
            return akp_and_weight_grads(grad_w, akp, weight, idx["family_i32"], idx["row_i32"], kernel_size,
                                        need_akp, need_weight)
        return double_backward.synthesis_gradients(first_order, grad_w, akp, layout)
    return gradients_of


def conv2d(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
           bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size: tuple[int, int]) -> torch.Tensor:
    """y [N, C_out, H_out, W_out] = F.conv2d(x, synthesize(akp, weight), bias, ...), with nn.Conv2d's
    autocast semantics (library_conv.autocast_inputs)."""
    x, bias, scope = library_conv.autocast_inputs(x, bias)
    with scope:
        return TritonConv2d.apply(x, akp, weight, bias, layout, conv, kernel_size)
