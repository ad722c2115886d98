"""Triton implicit-GEMM ACL convolution that synthesizes its weight tiles in registers.

The synthesized weight W [C_out, Cg, kH, kW] never exists in global memory, forward or backward:

* forward   y = x (*) W: implicit GEMM over M = N*H_out*W_out output pixels, N = C_out/g output
  channels, K = kH*kW*Cg taps x input channels. Each K-step gathers its x tile [BLOCK_M, BLOCK_K]
  through x's strides and builds its W tile [BLOCK_K, BLOCK_N] in registers: plain rows are
  loaded from ``weight``; analytic rows gather the six AKPs of each (o, c) slice once and
  evaluate the family formula at the grid point of the element's tap, which comes from the k
  index (acl_fused.backends.triton_families).
* grad_x    = grad_y (*)^T W: the transposed implicit GEMM (M = N*H*W input pixels, N = Cg,
  K = kH*kW*C_out/g) building the same W tiles the same way.
* grad_akp  from the weight-gradient GEMM dW[o, c, i, j] = sum_p grad_y[p, o] x[p + tap, c], one
  tap at a time: its epilogue contracts the tap's dW tile with dK/dAKP (family_value_and_grads)
  and accumulates over the kH*kW taps in registers, so only [A, Cg, 6] AKP gradients are written;
  plain rows' dW goes straight to grad_weight. The pixel reduction is split over programs to
  fill the GPU; each split writes its own partial and the partials are summed in a fixed order
  (deterministic, no atomics).

Cost trade-off (expected, not measured: no GPU to time on here). Every M-tile re-synthesizes the
W tiles it consumes, so synthesis work is (number of M-tiles) x C_out*Cg*kH*kW elements x (about
four exp/cos/sqrt per element plus the slice's positive maps and cos/sin theta, recomputed per
element) instead of once per layer; each synthesized element feeds BLOCK_M multiply-adds. Against
IEEE float32 / float64 FMA dots that is a modest overhead at BLOCK_M = 128-256; against TF32 /
fp16 / bf16 tensor-core dots (an order of magnitude faster per multiply-add) synthesis can cost as
much as the GEMM itself. What the fusion buys is no W round trip through memory, no per-family
launches and no autograd intermediates: it pays off for small and medium layers and when W's
traffic and launches dominate, and loses to cuDNN on W for large-channel layers on tensor cores.
Tiles whose output channels are all plain skip synthesis at run time, so a mostly-plain mosaic
costs close to a plain implicit-GEMM convolution. The weight-gradient epilogue runs once per tap
per program and is amortised over the program's whole pixel range. Depthwise-like shapes
(Cg and C_out/g far below 16) waste most of every 16-wide dot.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.torch_version import TorchVersion

from ..conv_args import ConvArgs
from ..layout import Layout
from ..validation import Problem, conv_weight_format
from . import double_backward, library_conv, triton_synthesis
from .triton_families import family_value, family_value_and_grads, grid_xy, store_akp_grads


#: @triton.jit picks interpreter or compiler when a kernel is decorated: the same choice
#: triton_synthesis's kernels were given at their import.
INTERPRETED = triton_synthesis.INTERPRETED


def interpreter_error(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter of these versions cannot run these kernels (None when it can).

    Before Triton 3.7 the interpreter turns a loop bound given at run time (the K loops here) into
    a Python int through a one-element array, which NumPy 2.4 refuses (seen with Triton 3.6.0:
    "TypeError: only 0-dimensional arrays can be converted to Python scalars"; 3.7.0 runs)."""
    if TorchVersion(triton_version) < "3.7" and TorchVersion(numpy_version) >= "2.4":
        return (f"Triton {triton_version}'s interpreter cannot run loops with run-time bounds under NumPy "
                f"{numpy_version}: use triton>=3.7 or numpy<2.4 (compiled GPU kernels are not affected)")
    return None


def _interpreter_error() -> Optional[str]:
    if not INTERPRETED:
        return None
    import numpy  # the interpreter's own dependency

    return interpreter_error(triton.__version__, numpy.__version__)


#: Why interpreted kernels cannot run here (None when they can or are compiled).
INTERPRETER_ERROR = _interpreter_error()

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                torch.float64: tl.float64}


#: ACL_FUSED_AUTOTUNE=0 keeps the first GPU candidate of each kernel instead of tuning: every new
#: shape of a test run would otherwise time them all (~0.13 s each) and compile them all.
AUTOTUNE = os.environ.get("ACL_FUSED_AUTOTUNE", "1") != "0"


def _configs(gpu: list[tuple[int, ...]], interpreted: tuple[int, ...], names: tuple[str, ...]) -> list:
    """Autotune configs (block sizes..., num_warps, num_stages); one small config under the
    interpreter, where tuning would only cost time and small tiles make tests cross tile edges."""
    rows = [interpreted] if INTERPRETED else gpu if AUTOTUNE else gpu[:1]
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


# Autotune candidates. Large BLOCK_M amortizes synthesis (each W element feeds BLOCK_M
# multiply-adds), but the family formulas keep ~20 [BLOCK_K, BLOCK_N] temporaries live, so
# registers, not shared memory, bound the tiles. Only spill-free candidates are listed, per kind of
# dot (_gemm_kind): measured compile-only for sm_90a (ptxas -v, 3x3 kernel, mosaic layout; no GPU
# here, so no timings). Tensor-core dots, Triton 3.9, registers per thread for float32 (TF32) /
# float16:
#   (128, 64, 16, 8 warps) fwd 225 / 191, grad_x 210 / 224     (128, 64, 32, 8 warps) fwd 255 / 255
#   (128, 32, 16, 4 warps) fwd 254 / 220                      (64, 64, 16, 4 warps)  fwd 235 / 234
#   (64, 32, 16, 4 warps)  fwd 180 / 168, grad_x 226 (f32)
# IEEE float32 and float64 dots hold more per thread: of these candidates only (64, 32, 16, 8 warps,
# 2 stages) is spill-free for both (Triton 3.6, the GPU image's: fwd 184 / 183, grad_x 202 / 182
# registers; the others spilled 44-1800 bytes, also the first, which the test runs with
# ACL_FUSED_AUTOTUNE=0 took for every dtype before).
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages):
_GEMM_CONFIGS = {
    kind: _configs(gpu, (32, 16, 16, 4, 1), ("BLOCK_M", "BLOCK_N", "BLOCK_K")) for kind, gpu in (
        ("tensor_core", [(128, 64, 16, 8, 3), (128, 64, 32, 8, 3), (128, 32, 16, 4, 3), (64, 64, 16, 4, 3),
                         (64, 32, 16, 4, 4), (64, 32, 16, 8, 2)]),
        ("full_precision", [(64, 32, 16, 8, 2)]))}


def _gemm_tuned(fn) -> dict:
    """{kind of dot: fn tuned over that kind's candidates} (see _GEMM_CONFIGS, _gemm_kind)."""
    return {kind: triton.autotune(configs=configs, key=["M", "CG", "COG", "KH", "KW"])(fn)
            for kind, configs in _GEMM_CONFIGS.items()}


# Weight-gradient GEMM: (BLOCK_P, num_warps, num_stages). Its [BLOCK_O, BLOCK_C] tile is fixed on
# the host (_param_tile) because the split of the pixel reduction depends on it. The epilogue's
# value-and-gradient formulas need 8 warps and no software pipelining to stay spill-free:
# [32, 32] tiles 229-246 registers (float32 / float16, BLOCK_P 32-128), float64 only at [16, 16]
# (187-192); 4 warps or 2-3 stages spilled 16-1900 bytes.
_PARAM_CONFIGS = _configs([(64, 8, 1), (32, 8, 1), (128, 8, 1)], (32, 4, 1), ("BLOCK_P",))
#: The weight-gradient split is chunked in multiples of every BLOCK_P candidate.
_P_CHUNK = 128


def _param_tile(synth_dtype: torch.dtype) -> int:
    """BLOCK_O = BLOCK_C of the weight-gradient kernel (see _PARAM_CONFIGS)."""
    return 16 if INTERPRETED or synth_dtype == torch.float64 else 32


# --------------------------------------------------------------------------------------------
# In-register weight tiles
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_akp(akp_ptr, row, c, mask, s_row, s_c, s_slot, SYNTH: tl.constexpr):
    """The six raw AKP slots of the (row, c) slices (broadcast shapes), in SYNTH."""
    ptr = akp_ptr + row.to(tl.int64) * s_row + c.to(tl.int64) * s_c
    a = tl.load(ptr, mask=mask, other=0.0).to(SYNTH)
    p1 = tl.load(ptr + s_slot, mask=mask, other=0.0).to(SYNTH)
    p2 = tl.load(ptr + 2 * s_slot, mask=mask, other=0.0).to(SYNTH)
    p3 = tl.load(ptr + 3 * s_slot, mask=mask, other=0.0).to(SYNTH)
    p4 = tl.load(ptr + 4 * s_slot, mask=mask, other=0.0).to(SYNTH)
    p5 = tl.load(ptr + 5 * s_slot, mask=mask, other=0.0).to(SYNTH)
    return a, p1, p2, p3, p4, p5


@triton.jit
def _weight_tile(code, row, c, i, j, tile_ok, akp_ptr, s_ar, s_ac, s_as, weight_ptr, s_wo, s_wc, s_wh, s_ww,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_PLAIN: tl.constexpr, HAS_ANALYTIC: tl.constexpr,
                 SYNTH: tl.constexpr, OUT: tl.constexpr):
    """W[o, c, i, j] for a tile of (o, c, i, j) given as broadcastable index tensors (o through its
    family ``code`` and parameter ``row``): plain rows read weight[row], analytic rows are
    synthesized from akp[row, c]; pairs outside ``tile_ok`` are 0. Returned in OUT (the dot's
    input dtype), computed in SYNTH."""
    plain = tile_ok & (code == 0)
    w = tl.zeros(plain.shape, SYNTH)
    if HAS_PLAIN:
        offs = row.to(tl.int64) * s_wo + c.to(tl.int64) * s_wc + i * s_wh + j * s_ww
        w = tl.load(weight_ptr + offs, mask=plain, other=0.0).to(SYNTH)
    if HAS_ANALYTIC:
        analytic = tile_ok & (code != 0)
        if tl.max(analytic.to(tl.int32)) > 0:  # all-plain tiles pay no transcendentals
            a, p1, p2, p3, p4, p5 = _load_akp(akp_ptr, row, c, analytic, s_ar, s_ac, s_as, SYNTH)
            x, y = grid_xy(i, j, KH, KW, SYNTH)
            inv_area = tl.full([], 1.0, SYNTH) / (KH * KW)
            w += family_value(code, a, p1, p2, p3, p4, p5, x, y, inv_area)
    return w.to(OUT)


# --------------------------------------------------------------------------------------------
# Forward: y[n, o, oh, ow] = bias[o] + sum_{c, i, j} x[n, c, oh*sh - top + i*dh, ...] W[o, c, i, j]
# K index k = tap * Cg + c with tap = i * kW + j (tap-major: a K-block mostly shares one tap).
# --------------------------------------------------------------------------------------------
@triton.jit
def _conv_forward(
        x_ptr, akp_ptr, weight_ptr, bias_ptr, family_ptr, row_ptr, y_ptr,
        M, CG, COG, H, W, HO, WO,
        s_xn, s_xc, s_xh, s_xw, s_ar, s_ac, s_as, s_wo, s_wc, s_wh, s_ww, s_yn, s_yc, s_yh, s_yw,
        SH, SW, PT, PL, DH, DW,
        KH: tl.constexpr, KW: tl.constexpr, HAS_PLAIN: tl.constexpr, HAS_ANALYTIC: tl.constexpr,
        HAS_BIAS: tl.constexpr, SYNTH: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    ow = m % WO
    oh = (m // WO) % HO
    n = (m // WO // HO).to(tl.int64)
    o_local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o_local < COG
    o = g * COG + o_local
    code = tl.load(family_ptr + o, mask=o_ok, other=0)
    row = tl.load(row_ptr + o, mask=o_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, KH * KW * CG, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < KH * KW * CG
        c = k % CG
        i = k // CG // KW
        j = k // CG % KW
        ih = oh[:, None] * SH - PT + (i * DH)[None, :]
        iw = ow[:, None] * SW - PL + (j * DW)[None, :]
        ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_offs = (n * s_xn)[:, None] + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw \
            + ((g * CG + c).to(tl.int64) * s_xc)[None, :]
        xt = tl.load(x_ptr + x_offs, mask=ok, other=0.0)
        wt = _weight_tile(code[None, :], row[None, :], c[:, None], i[:, None], j[:, None],
                          k_ok[:, None] & o_ok[None, :], akp_ptr, s_ar, s_ac, s_as, weight_ptr, s_wo, s_wc, s_wh, s_ww,
                          KH, KW, HAS_PLAIN, HAS_ANALYTIC, SYNTH, xt.dtype)
        acc += tl.dot(xt.to(DOT), wt.to(DOT), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(ACC)[None, :]
    y_offs = (n * s_yn + oh.to(tl.int64) * s_yh + ow.to(tl.int64) * s_yw)[:, None] \
        + o.to(tl.int64)[None, :] * s_yc
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


_FORWARD_KERNELS = _gemm_tuned(_conv_forward)


# --------------------------------------------------------------------------------------------
# grad_x[n, c, h, w] = sum_{o, i, j : h = oh*sh - top + i*dh, ...} grad_y[n, o, oh, ow] W[o, c, i, j]
# K index k = tap * C_out/g + o.
# --------------------------------------------------------------------------------------------
@triton.jit
def _conv_grad_input(
        dy_ptr, akp_ptr, weight_ptr, family_ptr, row_ptr, dx_ptr,
        M, CG, COG, H, W, HO, WO,
        s_dn, s_dc, s_dh, s_dw, s_ar, s_ac, s_as, s_wo, s_wc, s_wh, s_ww, s_xn, s_xc, s_xh, s_xw,
        SH, SW, PT, PL, DH, DW,
        KH: tl.constexpr, KW: tl.constexpr, HAS_PLAIN: tl.constexpr, HAS_ANALYTIC: tl.constexpr,
        SYNTH: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A strided convolution leaves most (pixel, tap) pairs without a source output pixel: they are
    # masked, so grad_x does ~stride_h*stride_w times the useful dot work (no phase split).
    # Pixels that no output reads at all get 0, as in F.conv2d, not the masked zeros times W (NaN
    # where W is NaN).
    g = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    w_in = m % W
    h_in = (m // W) % H
    n = (m // W // H).to(tl.int64)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < CG
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, KH * KW * COG, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < KH * KW * COG
        o = g * COG + k % COG
        i = k // COG // KW
        j = k // COG % KW
        code = tl.load(family_ptr + o, mask=k_ok, other=0)
        row = tl.load(row_ptr + o, mask=k_ok, other=0)
        th = h_in[:, None] + PT - (i * DH)[None, :]
        tw = w_in[:, None] + PL - (j * DW)[None, :]
        oh = th // SH
        ow = tw // SW
        ok = m_ok[:, None] & k_ok[None, :] & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) \
            & (oh < HO) & (ow < WO)
        dy_offs = (n * s_dn)[:, None] + oh.to(tl.int64) * s_dh + ow.to(tl.int64) * s_dw \
            + (o.to(tl.int64) * s_dc)[None, :]
        dyt = tl.load(dy_ptr + dy_offs, mask=ok, other=0.0)
        wt = _weight_tile(code[:, None], row[:, None], c[None, :], i[:, None], j[:, None],
                          k_ok[:, None] & c_ok[None, :], akp_ptr, s_ar, s_ac, s_as, weight_ptr, s_wo, s_wc, s_wh, s_ww,
                          KH, KW, HAS_PLAIN, HAS_ANALYTIC, SYNTH, dyt.dtype)
        acc += tl.dot(dyt.to(DOT), wt.to(DOT), input_precision=PRECISION)
    read = _read_by_some_tap(h_in, PT, SH, DH, HO, KH) & _read_by_some_tap(w_in, PL, SW, DW, WO, KW)
    acc = tl.where(read[:, None], acc, 0.0)
    dx_offs = (n * s_xn + h_in.to(tl.int64) * s_xh + w_in.to(tl.int64) * s_xw)[:, None] \
        + (g * CG + c).to(tl.int64)[None, :] * s_xc
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _read_by_some_tap(pos, PAD, S, D, OUT, K: tl.constexpr):
    """Whether some output reads input position ``pos`` along one axis (padding PAD, stride S,
    dilation D, OUT outputs, K taps)."""
    read = tl.zeros_like(pos) != 0
    for i in tl.static_range(K):
        t = pos + PAD - i * D
        read = read | ((t >= 0) & (t % S == 0) & (t // S < OUT))
    return read


_GRAD_INPUT_KERNELS = _gemm_tuned(_conv_grad_input)


# --------------------------------------------------------------------------------------------
# grad_akp / grad_weight: per tap, dW tile = grad_y^T x over this split's pixels, then the epilogue
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_PARAM_CONFIGS, key=["P_PER_SPLIT", "CG", "COG", "KH", "KW"])
@triton.jit
def _conv_grad_params_kernel(
        dy_ptr, x_ptr, akp_ptr, family_ptr, row_ptr, gakp_ptr, gweight_ptr,
        P, P_PER_SPLIT, SPLIT, CG, COG, H, W, HO, WO,
        s_dn, s_dc, s_dh, s_dw, s_xn, s_xc, s_xh, s_xw, s_ar, s_ac, s_as, s_gas, s_gws,
        SH, SW, PT, PL, DH, DW,
        KH: tl.constexpr, KW: tl.constexpr, WANT_PLAIN: tl.constexpr, WANT_ANALYTIC: tl.constexpr,
        SYNTH: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Writes this split's partials: gakp[split, row, c, slot] (analytic rows, all six slots) and
    gweight[split, row, c, i, j] (plain rows); both contiguous but for the split strides."""
    g = tl.program_id(0) // SPLIT
    split = tl.program_id(0) % SPLIT
    o_local = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o_local < COG
    o = g * COG + o_local
    code = tl.load(family_ptr + o, mask=o_ok, other=0)
    row = tl.load(row_ptr + o, mask=o_ok, other=0)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CG
    tile_ok = o_ok[:, None] & c_ok[None, :]
    plain = tile_ok & (code[:, None] == 0)
    analytic = tile_ok & (code[:, None] != 0)
    any_analytic = tl.max(analytic.to(tl.int32)) > 0
    dy_o = o.to(tl.int64) * s_dc
    x_c = (g * CG + c).to(tl.int64) * s_xc
    inv_area = tl.full([], 1.0, SYNTH) / (KH * KW)
    a = tl.zeros([BLOCK_O, BLOCK_C], SYNTH)
    p1, p2, p3, p4, p5 = a, a, a, a, a
    if WANT_ANALYTIC:
        a, p1, p2, p3, p4, p5 = _load_akp(akp_ptr, row[:, None], c[None, :], analytic, s_ar, s_ac, s_as, SYNTH)
    g0 = tl.zeros([BLOCK_O, BLOCK_C], SYNTH)
    g1, g2, g3, g4, g5 = g0, g0, g0, g0, g0
    gakp_split = gakp_ptr + split.to(tl.int64) * s_gas
    gweight_split = gweight_ptr + split.to(tl.int64) * s_gws
    p_start = split * P_PER_SPLIT
    p_end = tl.minimum(p_start + P_PER_SPLIT, P)
    for tap in range(KH * KW):
        i = tap // KW
        j = tap % KW
        gx, gy = grid_xy(i, j, KH, KW, SYNTH)
        dw = tl.zeros([BLOCK_O, BLOCK_C], ACC)
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_ok = p < p_end
            ow = p % WO
            oh = (p // WO) % HO
            n = ((p // WO) // HO).to(tl.int64)
            dy_pix = n * s_dn + oh.to(tl.int64) * s_dh + ow.to(tl.int64) * s_dw
            dyt = tl.load(dy_ptr + dy_o[:, None] + dy_pix[None, :], mask=o_ok[:, None] & p_ok[None, :], other=0.0)
            ih = oh * SH - PT + i * DH
            iw = ow * SW - PL + j * DW
            pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = n * s_xn + ih.to(tl.int64) * s_xh + iw.to(tl.int64) * s_xw
            xt = tl.load(x_ptr + x_pix[:, None] + x_c[None, :], mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            dw += tl.dot(dyt.to(DOT), xt.to(DOT), input_precision=PRECISION)
        if WANT_PLAIN:
            gw_offs = ((row.to(tl.int64)[:, None] * CG + c[None, :]) * KH + i) * KW + j
            tl.store(gweight_split + gw_offs, dw.to(gweight_ptr.dtype.element_ty), mask=plain)
        if WANT_ANALYTIC:
            if any_analytic:
                _, d0, d1, d2, d3, d4, d5 = family_value_and_grads(code[:, None], a, p1, p2, p3, p4, p5, gx, gy,
                                                                   inv_area)
                dws = dw.to(SYNTH)
                g0 += dws * d0
                g1 += dws * d1
                g2 += dws * d2
                g3 += dws * d3
                g4 += dws * d4
                g5 += dws * d5
    if WANT_ANALYTIC:
        store_akp_grads(gakp_split + ((row.to(tl.int64)[:, None] * CG + c[None, :]) * 6), code[:, None], analytic,
                        g0, g1, g2, g3, g4, g5)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def _tf32_allowed() -> bool:
    """Whether PyTorch lets float32 convolutions use TF32 (cuDNN's flag; newer torch has a
    per-op precision that overrides the legacy allow_tf32 when set)."""
    precision = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and not INTERPRETED and _tf32_allowed() else "ieee"


def _dot_dtype(x_dtype: torch.dtype):
    """tl.dot operand type: x's dtype. Triton's interpreter (3.9) multiplies bfloat16 operands as
    their raw uint16 bits, so there they go in as float32: exact (a product of two bfloat16
    values fits in float32), like the GPU's bfloat16 dot with float32 accumulation."""
    return tl.float32 if INTERPRETED and x_dtype == torch.bfloat16 else _TORCH_TO_TL[x_dtype]


def _gemm_kind(x_dtype: torch.dtype) -> str:
    """The kind of dot of x's dtype, whose candidates the GEMM kernels tune over (_GEMM_CONFIGS)."""
    full = x_dtype == torch.float64 or (x_dtype == torch.float32 and _dot_precision(x_dtype) == "ieee")
    return "full_precision" if full else "tensor_core"


def _synth_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Synthesis runs in float64 for float64 parameters, else in float32 (half/bf16 included)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _output_format(x: torch.Tensor, ops: "_Operands") -> torch.memory_format:
    """The memory format F.conv2d gives its output and input gradient for x and a W in ops.w_format:
    ATen's own choice, its convolution backend's (cuDNN keeps float64 contiguous, ATen's CUDA depthwise
    kernel every dtype). Both read only the weight's shape, dtype and strides: a meta W, no memory."""
    w = torch.empty((ops.cog * ops.groups, ops.cg, ops.kh, ops.kw), dtype=x.dtype, device="meta",
                    memory_format=ops.w_format)
    stride, dilation = ops.geometry[:2], ops.geometry[4:]
    backend = torch._C._select_conv_backend(x, w, None, stride, ops.format_padding, dilation, False, [0, 0], ops.groups,
                                            None)
    return torch._C._conv_determine_backend_memory_format(x, w, backend)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _param_split(p: int, base_programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) of the weight-gradient reduction over p = N*H_out*W_out: enough
    programs to fill the GPU (about 2 per SM), never more splits than _P_CHUNK-sized chunks. The
    interpreter uses up to 3 so tests exercise the partial-sum path."""
    target = 2 * _sm_count(device) if device.type == "cuda" and not INTERPRETED else 3
    chunks = max(1, triton.cdiv(p, _P_CHUNK))
    splits = max(1, min(chunks, target // max(1, base_programs)))
    per_split = triton.cdiv(chunks, splits) * _P_CHUNK
    return triton.cdiv(p, per_split) if p else 1, per_split


class _Operands:
    """What every kernel reads besides the activations: the parameters, layout index tensors,
    dtypes and convolution geometry, with dummies for absent parameter tensors."""

    def __init__(self, x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
                 conv: ConvArgs, kernel_size: tuple[int, int]):
        idx = layout.tensors(x.device)
        self.family, self.row = idx["family_i32"], idx["row_i32"]
        self.has_plain = weight is not None
        self.w_format = conv_weight_format(x, weight)
        self.has_analytic = akp.shape[0] > 0
        self.akp = akp if self.has_analytic else weight  # a valid pointer of the right dtype
        self.weight = weight if self.has_plain else akp
        self.akp_strides = akp.stride() if self.has_analytic else (0, 0, 0)
        self.weight_strides = weight.stride() if self.has_plain else (0, 0, 0, 0)
        self.kh, self.kw = kernel_size
        self.cg = akp.shape[1]
        self.groups = conv.groups
        self.cog = layout.out_channels // conv.groups
        top, bottom, left, right = conv.explicit_padding(kernel_size)
        self.geometry = (*conv.stride, top, left, *conv.dilation)
        # F.conv2d pads an input with unequal sides ('same', an even dilated kernel) on the larger
        # ones first (F.pad keeps its memory format), then convolves it: as padding of each side,
        # the larger stands in for it where only the memory format is asked (_output_format)
        self.format_padding = (max(top, bottom), max(left, right))
        self.synth = _TORCH_TO_TL[_synth_dtype(akp.dtype)]


def _dtypes(x_dtype: torch.dtype, ops: "_Operands") -> dict:
    """The kernels' dtype and precision constexprs."""
    return dict(SYNTH=ops.synth, DOT=_dot_dtype(x_dtype), ACC=_TORCH_TO_TL[_acc_dtype(x_dtype)],
                PRECISION=_dot_precision(x_dtype))


@triton_synthesis.launches_kernels
def _forward(x: torch.Tensor, ops: _Operands, bias: Optional[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
    """y [N, C_out, H_out, W_out] in x's dtype and F.conv2d's output memory format."""
    n, _, h, w = x.shape
    ho, wo = out_hw
    y = torch.empty((n, ops.cog * ops.groups, ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=_output_format(x, ops))
    m = n * ho * wo
    if m == 0:
        return y
    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(ops.cog, meta["BLOCK_N"]), ops.groups

    _FORWARD_KERNELS[_gemm_kind(x.dtype)][grid](
        x, ops.akp, ops.weight, y if bias is None else bias.contiguous(), ops.family, ops.row, y,  # bias[o] at o
        m, ops.cg, ops.cog, h, w, ho, wo,
        *x.stride(), *ops.akp_strides, *ops.weight_strides, *y.stride(), *ops.geometry,
        KH=ops.kh, KW=ops.kw, HAS_PLAIN=ops.has_plain, HAS_ANALYTIC=ops.has_analytic, HAS_BIAS=bias is not None,
        **_dtypes(x.dtype, ops))
    return y


@triton_synthesis.launches_kernels
def _grad_input(grad_y: torch.Tensor, x: torch.Tensor, ops: _Operands) -> torch.Tensor:
    """grad_x [N, C_in, H, W] in x's dtype and the memory format of F.conv2d's input gradient."""
    n, _, h, w = x.shape
    ho, wo = grad_y.shape[-2:]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_output_format(x, ops))
    m = n * h * w
    if m == 0:
        return dx
    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(ops.cg, meta["BLOCK_N"]), ops.groups

    _GRAD_INPUT_KERNELS[_gemm_kind(x.dtype)][grid](
        grad_y, ops.akp, ops.weight, ops.family, ops.row, dx,
        m, ops.cg, ops.cog, h, w, ho, wo,
        *grad_y.stride(), *ops.akp_strides, *ops.weight_strides, *dx.stride(), *ops.geometry,
        KH=ops.kh, KW=ops.kw, HAS_PLAIN=ops.has_plain, HAS_ANALYTIC=ops.has_analytic, **_dtypes(x.dtype, ops))
    return dx


@triton_synthesis.launches_kernels
def _grad_params(grad_y: torch.Tensor, x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor],
                 ops: _Operands, want_akp: bool, want_weight: bool
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_akp [A, Cg, 6] or None, grad_weight [P, Cg, kH, kW] or None), in the params' dtype."""
    want_analytic = want_akp and ops.has_analytic
    want_plain = want_weight and ops.has_plain
    n, _, h, w = x.shape
    ho, wo = grad_y.shape[-2:]
    p = n * ho * wo
    tile = _param_tile(_synth_dtype(akp.dtype))
    splits, per_split = _param_split(
        p, ops.groups * triton.cdiv(ops.cog, tile) * triton.cdiv(ops.cg, tile), x.device)
    # per-split partials in the synthesis dtype; p == 0 launches nothing, so they start at zero
    alloc = functools.partial(torch.empty if p else torch.zeros, dtype=_synth_dtype(akp.dtype), device=x.device)
    ga = alloc((splits, *akp.shape)) if want_analytic else None
    gw = alloc((splits, *weight.shape)) if want_plain else None
    if p and (want_analytic or want_plain):
        ga_arg = ga if want_analytic else gw  # a stand-in pointer the kernel never writes
        gw_arg = gw if want_plain else ga
        grid = (ops.groups * splits, triton.cdiv(ops.cog, tile), triton.cdiv(ops.cg, tile))
        _conv_grad_params_kernel[grid](
            grad_y, x, ops.akp, ops.family, ops.row, ga_arg, gw_arg,
            p, per_split, splits, ops.cg, ops.cog, h, w, ho, wo,
            *grad_y.stride(), *x.stride(), *ops.akp_strides, ga_arg.stride(0), gw_arg.stride(0), *ops.geometry,
            KH=ops.kh, KW=ops.kw, WANT_PLAIN=want_plain, WANT_ANALYTIC=want_analytic, **_dtypes(x.dtype, ops),
            BLOCK_O=tile, BLOCK_C=tile)
    # summing the partials over their leading axis has a fixed order: deterministic
    grad_akp = None
    if want_akp:
        grad_akp = ga.sum(0).to(akp.dtype) if want_analytic else torch.zeros_like(akp)
    grad_weight = gw.sum(0).to(weight.dtype) if want_plain else None
    return grad_akp, grad_weight


class TritonACLConv2d(torch.autograd.Function):
    """y = conv2d(x, W(akp, weight, layout), bias) with W synthesized tile by tile in registers.

    Saves x, akp and weight only; backward recomputes the W tiles it needs inside its kernels.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], layout: Layout, conv: ConvArgs,
                kernel_size: tuple[int, int]) -> torch.Tensor:
        ops = _Operands(x, akp, weight, layout, conv, kernel_size)
        y = _forward(x, ops, bias, conv.output_size(tuple(x.shape[-2:]), kernel_size))
        ctx.save_for_backward(x, akp, weight)
        ctx.layout, ctx.conv, ctx.kernel_size = layout, conv, kernel_size
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, akp, weight = ctx.saved_tensors
        layout, kernel_size = ctx.layout, ctx.kernel_size
        if torch.is_grad_enabled():  # a graph recorded (create_graph): W materialised, differentiable steps
            grads = double_backward.conv2d_gradients(
                grad_y, x, akp, weight, triton_synthesis.bound_synthesis(layout, kernel_size),
                triton_synthesis.bound_synthesis_gradients(akp, weight, layout, kernel_size), ctx.conv, kernel_size,
                ctx.needs_input_grad)
            return (*grads, None, None, None)
        need_x, need_akp, need_weight, need_bias = ctx.needs_input_grad[:4]
        ops = _Operands(x, akp, weight, layout, ctx.conv, kernel_size)
        grad_x = _grad_input(grad_y, x, ops) if need_x else None
        grad_akp = grad_weight = None
        if need_akp or need_weight:
            grad_akp, grad_weight = _grad_params(grad_y, x, akp, weight, ops, need_akp, need_weight)
        grad_bias = grad_y.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_akp, grad_weight, grad_bias, None, None, None


# --------------------------------------------------------------------------------------------
# Backend protocol (acl_fused/dispatch.py)
# --------------------------------------------------------------------------------------------
#: CUDA's limit on a launch grid's second and third axes.
_MAX_GRID_Z = 65535
#: The kernels index pixels (n, h, w flattened: N x H x W of the padded input, N x H_out x W_out)
#: in int32, up to one tile (at most 1024 pixels) past the last.
_MAX_PIXELS = 2**31 - 1024


def why_not(problem: Problem) -> Optional[str]:
    if problem.conv is None:  # synthesis alone is the "triton" backend's job
        return triton_synthesis.why_not(problem)
    if problem.device.type == "cpu" and not INTERPRETED:
        return ("Triton kernels need a CUDA device; on CPU they run only under the interpreter "
                "(TRITON_INTERPRET=1 set before acl_fused.backends.triton_conv is imported)")
    if problem.device.type == "cpu" and INTERPRETER_ERROR is not None:
        return INTERPRETER_ERROR
    if problem.device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA devices, not {problem.device.type}"
    if problem.input_shape[1] == 0:
        return ("the input has no channels: F.conv2d then gives an output without channels (ATen's rule), "
                "these kernels one of C_out channels")
    if problem.conv.groups > _MAX_GRID_Z:
        return (f"groups={problem.conv.groups}: the convolution kernels launch one program column per group, "
                f"on the launch grid's third axis, which CUDA limits to {_MAX_GRID_Z}")
    n, _, h, w = problem.input_shape
    top, bottom, left, right = problem.conv.explicit_padding(problem.kernel_size)
    pixels = n * max((h + top + bottom) * (w + left + right),
                     math.prod(problem.conv.output_size((h, w), problem.kernel_size)))
    if pixels > _MAX_PIXELS:
        return (f"{pixels} pixels (batch x height x width of the padded input or the output): these kernels "
                f"index pixels in 32-bit integers, up to {_MAX_PIXELS}")
    return None


def synthesize(akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
               kernel_size: tuple[int, int]) -> torch.Tensor:
    """W [C_out, Cg, kH, kW]: the one-launch Triton synthesis of the "triton" backend (this
    backend never needs W itself)."""
    return triton_synthesis.synthesize(akp, weight, layout, kernel_size)


def conv2d(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
           bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size: tuple[int, int]) -> torch.Tensor:
    """y [N, C_out, H_out, W_out] = F.conv2d(x, W, bias, ...) without materialising W. Under
    autocast x and bias run in the autocast dtype; the tiles are synthesized in float32 and cast."""
    x, bias, scope = library_conv.autocast_inputs(x, bias)
    with scope:
        return TritonACLConv2d.apply(x, akp, weight, bias, layout, conv, kernel_size)
