"""Pure-PyTorch, autograd-native ACL: SPEC §2-§5 written as plainly as possible.

Everything else in the project is checked against this file. It is vectorised over channels
(one batch of elementwise ops per family present, never a loop over output channels) and works
for any kernel size (odd, even, non-square) and any floating dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .conv_args import ConvArgs, IntOrPair, PaddingArg
from .families import Family, FamilyLike, pos
from .layout import Layout, as_layout
from .validation import autocast_enabled, check_conv_inputs, check_synthesis_inputs, conv_weight_format, laid_out


def grid(kernel_size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §2 sampling grid: x [1, 1, 1, kW] (along width), y [1, 1, kH, 1] (along height)."""
    kh, kw = kernel_size
    x = torch.arange(kw, dtype=dtype, device=device) - (kw - 1) / 2
    y = torch.arange(kh, dtype=dtype, device=device) - (kh - 1) / 2
    return x.view(1, 1, 1, kw), y.view(1, 1, kh, 1)


def _rotate(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(theta), torch.sin(theta)
    return x * c + y * s, -x * s + y * c


def _gauss(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # exp(-u²/(2s²)) as exp(-(u/s)²/2): u/s stays finite where u² and s² overflow (a huge raw scale),
    # so finite raw AKPs give finite kernels (SPEC §3)
    return torch.exp(-0.5 * (u / s) ** 2)


def family_kernel(family: Family, p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """K_family for AKPs p [R, Cg, 6] on the grid (x, y) -> [R, Cg, kH, kW] (SPEC §4)."""
    a = p[..., 0, None, None]
    q = [p[..., i, None, None] for i in range(6)]
    if family == Family.GABOR:
        theta, sigma, gamma, lam, psi = q[1], pos(q[2]), pos(q[3]), pos(q[4]), q[5]
        xr, yr = _rotate(theta, x, y)
        # the envelope exp(-(x'² + γ² y'²) / (2σ²)) in x'/σ and γy'/σ, as _gauss
        return a * torch.exp(-0.5 * ((xr / sigma) ** 2 + (gamma * yr / sigma) ** 2)) \
            * torch.cos(2 * math.pi * xr / lam + psi)
    if family == Family.LOG:
        sigma = pos(q[1])
        t = (x * x + y * y) / (2 * sigma * sigma)
        return a * (1 - t) * torch.exp(-t)
    if family == Family.LOT:
        rho = pos(q[1])
        r = torch.sqrt(x * x + y * y)
        # relu's derivative is 0 at the tie, as SPEC §4 prescribes for max(0, .)
        return a * (torch.relu(1 - r / rho) - 0.25 * torch.relu(1 - r / (2 * rho)))
    if family == Family.TGD1:
        theta, sigma = q[1], pos(q[2])
        xr, yr = _rotate(theta, x, y)
        # the lobes G_σ(x' ∓ σ) in x'/σ ∓ 1: (x' - σ)/σ is inf/inf where σ overflows (a raw s_σ beyond
        # 88.7 in float32), x'/σ - 1 is -1, the other backends' value (csrc/families.h)
        u = xr / sigma
        return a * (torch.exp(-0.5 * (u - 1) ** 2) - torch.exp(-0.5 * (u + 1) ** 2)) * _gauss(yr, sigma)
    if family == Family.TGD2:
        theta, sigma = q[1], pos(q[2])
        xr, yr = _rotate(theta, x, y)
        return a * (_gauss(xr, sigma) - 0.5 * _gauss(xr, 2 * sigma)) * _gauss(yr, sigma)
    if family == Family.MEAN:
        return (a / (x.shape[-1] * y.shape[-2])).expand(-1, -1, y.shape[-2], x.shape[-1])
    raise ValueError(f"{family!r} is not an analytic family")


def synthesize_layout(akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
                      kernel_size: tuple[int, int]) -> torch.Tensor:
    """W [C_out, Cg, kH, kW] from validated inputs (see :func:`synthesize`).

    float16/bfloat16 AKPs are synthesized in float32 and W is rounded once to their dtype."""
    idx = layout.tensors(akp.device)
    compute = torch.float32 if akp.dtype in (torch.float16, torch.bfloat16) else akp.dtype
    x, y = grid(kernel_size, compute, akp.device)
    pieces = [] if weight is None else [weight.to(compute)]
    for family in layout.family_rows:
        pieces.append(family_kernel(family, akp[idx[f"rows_{int(family)}"]].to(compute), x, y))
    if not layout.family_rows:  # the empty akp still takes part, so that it gets a gradient (DDP wants one)
        pieces.append(akp.to(compute)[..., :1, None].expand(0, -1, *kernel_size))
    stacked = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
    # Indexing, not index_select: Inductor (torch 2.13, CPU) compiles index_select's backward under
    # torch.func.vmap(grad) into wrong gradients (2.5x too large in a five-line repro; indexing,
    # gather and cat come out right), which made torch.compile(vmap(grad(...))) of this path wrong.
    return stacked[idx["gather_order"]].to(akp.dtype)


def synthesize(akp: Optional[torch.Tensor], weight: Optional[torch.Tensor],
               family: Union[Layout, torch.Tensor, Sequence[FamilyLike]],
               kernel_size: Optional[IntOrPair] = None) -> torch.Tensor:
    """Synthesized weight W [C_out, C_in/g, kH, kW] (SPEC §5).

    Args:
        akp: [A, C_in/g, 6] raw AKPs of the analytic output channels, in output-channel order
            (None or [0, C_in/g, 6] when A = 0).
        weight: [P, C_in/g, kH, kW] plain kernels, in output-channel order (None when P = 0).
        family: [C_out] family codes (int tensor, sequence of codes/names, or a Layout).
        kernel_size: (kH, kW); required when there is no plain weight to read it from.
    """
    layout = as_layout(family)
    akp, weight, ks, _ = check_synthesis_inputs(akp, weight, layout, kernel_size)
    return synthesize_layout(akp, weight, layout, ks)


def acl_conv2d(x: torch.Tensor, akp: Optional[torch.Tensor], weight: Optional[torch.Tensor],
               family: Union[Layout, torch.Tensor, Sequence[FamilyLike]], bias: Optional[torch.Tensor] = None,
               stride: IntOrPair = 1, padding: PaddingArg = 0, dilation: IntOrPair = 1, groups: int = 1,
               kernel_size: Optional[IntOrPair] = None) -> torch.Tensor:
    """y = conv2d(x, synthesize(akp, weight, family), bias, ...) with nn.functional.conv2d meaning.

    x [N, C_in, H, W] -> y [N, C_out, H_out, W_out]. Under autocast the weight is synthesized in
    the parameters' dtype and the convolution runs in the autocast dtype, like nn.Conv2d.
    """
    layout = as_layout(family)
    conv = ConvArgs.make(stride, padding, dilation, groups)
    akp, weight, ks, cg = check_synthesis_inputs(akp, weight, layout, kernel_size)
    check_conv_inputs(x, akp, weight, layout, bias, conv, ks, cg)
    return conv2d_layout(x, akp, weight, layout, bias, conv, ks)


def conv2d_layout(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
                  bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size: tuple[int, int]) -> torch.Tensor:
    """:func:`acl_conv2d` on validated inputs."""
    if autocast_enabled(x.device):
        with torch.autocast(x.device.type, enabled=False):
            w = synthesize_layout(akp, weight, layout, kernel_size)
    else:
        w = synthesize_layout(akp, weight, layout, kernel_size)
    w = laid_out(w, conv_weight_format(x, weight))  # nn.Conv2d's output layout
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
