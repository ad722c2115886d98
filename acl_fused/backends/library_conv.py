"""The library convolution (cuDNN / oneDNN through ATen) that the synthesis backends wrap.

Backends that synthesize W with their own kernels and leave the GEMM to torch share these
helpers, so padding='same' with even kernels, autocast and channels_last behave exactly as in
``torch.nn.functional.conv2d`` everywhere.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..conv_args import ConvArgs
from ..validation import autocast_dtype, laid_out


def autocast_inputs(x: torch.Tensor, bias: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor], contextlib.AbstractContextManager]:
    """(x, bias, scope) with nn.Conv2d's autocast semantics: when autocast applies to x (on for its
    device, x not float64: validation.autocast_dtype), x and bias come back cast to the autocast dtype (cast here, outside any autograd Function, so
    autograd casts their gradients back) and ``scope`` switches autocast off for the backend's
    call, which synthesizes W in the parameters' dtype and casts it to ``x.dtype``. Without
    autocast they come back as they are, with a no-op scope."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return x, bias, contextlib.nullcontext()
    return (x.to(dtype), None if bias is None else bias.to(dtype),
            torch.autocast(x.device.type, enabled=False))


def conv_forward(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], conv: ConvArgs,
                 w_format: torch.memory_format) -> torch.Tensor:
    """y [N, C_out, H_out, W_out] = F.conv2d(x, w, bias, ...) in ``x.dtype``, with w in ``w_format``
    (validation.conv_weight_format: it decides y's layout)."""
    return F.conv2d(x, laid_out(w, w_format, x.dtype), None if bias is None else bias.to(x.dtype),
                    conv.stride, conv.padding, conv.dilation, conv.groups)


def pad_unequal_sides(x: torch.Tensor, padding: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """(x padded by what each side's zero padding (top, bottom, left, right) has beyond its pair's
    smaller one, [pad_h, pad_w]: the symmetric padding left to the convolution): how F.conv2d does
    unequal sides ('same' with an even dilated kernel). x itself when the sides are equal."""
    top, bottom, left, right = padding
    pad_h, pad_w = min(top, bottom), min(left, right)
    if (top, left) != (bottom, right):
        x = F.pad(x, (left - pad_w, right - pad_w, top - pad_h, bottom - pad_h))
    return x, [pad_h, pad_w]


def unpadded_gradient(grad_x_padded: torch.Tensor, x: torch.Tensor, padding: Sequence[int],
                      symmetric: Sequence[int]) -> torch.Tensor:
    """x's gradient out of its :func:`pad_unequal_sides` copy's: a tensor of its own, not a view of
    the padded one's, laid out as the convolution's gradient suggests (F.conv2d's is constant_pad_nd's
    backward, a clone of the narrowed gradient). ``padding``: (top, bottom, left, right)."""
    h, w = x.shape[-2:]
    i, j = padding[0] - symmetric[0], padding[2] - symmetric[1]
    return grad_x_padded[..., i:i + h, j:j + w].clone()


def conv_backward(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conv: ConvArgs,
                  kernel_size: tuple[int, int], output_mask: tuple[bool, bool, bool], w_format: torch.memory_format
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_x, grad_w, grad_bias) of :func:`conv_forward`; entries not asked for in
    ``output_mask`` (x, w, bias) are None. grad_w is in ``x.dtype``.

    Asymmetric padding (padding='same' with an even dilated kernel) is done the way F.conv2d does
    it (:func:`pad_unequal_sides`).
    """
    padding = conv.explicit_padding(kernel_size)
    x_p, symmetric = pad_unequal_sides(x, padding)
    grad_y = grad_y.to(x.dtype)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_y, x_p, laid_out(w, w_format, x.dtype), [w.shape[0]] if output_mask[2] else None,
        list(conv.stride), symmetric, list(conv.dilation), False, [0, 0], conv.groups, list(output_mask))
    if gx is not None and x_p is not x:
        gx = unpadded_gradient(gx, x, padding, symmetric)
    return gx, gw, gb
