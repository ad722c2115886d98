"""Public functional API: validate once, pick a backend, run it."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import dispatch
from .conv_args import ConvArgs, IntOrPair, PaddingArg
from .families import FamilyLike
from .layout import Layout, as_layout
from .validation import check_conv_inputs, check_synthesis_inputs, make_problem

FamilyArg = Union[Layout, torch.Tensor, Sequence[FamilyLike]]


def synthesize(akp: Optional[torch.Tensor], weight: Optional[torch.Tensor], family: FamilyArg,
               kernel_size: Optional[IntOrPair] = None, backend: str = "auto") -> torch.Tensor:
    """Synthesized weight W [C_out, C_in/g, kH, kW] (SPEC §5), differentiable w.r.t. akp and weight.

    akp [A, C_in/g, 6], weight [P, C_in/g, kH, kW] (None when P = 0), family [C_out] codes or names
    (a device tensor is read back once per call; pass a :class:`Layout` to avoid that).
    """
    layout = as_layout(family)
    akp, weight, ks, _ = check_synthesis_inputs(akp, weight, layout, kernel_size)
    problem = make_problem(akp, layout, ks, requires_grad=akp.requires_grad or
                           (weight is not None and weight.requires_grad))
    return dispatch.select(backend, problem).synthesize(akp, weight, layout, ks)


def acl_conv2d(x: torch.Tensor, akp: Optional[torch.Tensor], weight: Optional[torch.Tensor], family: FamilyArg,
               bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1, padding: PaddingArg = 0,
               dilation: IntOrPair = 1, groups: int = 1, kernel_size: Optional[IntOrPair] = None,
               backend: str = "auto") -> torch.Tensor:
    """ACL convolution: x [N, C_in, H, W] -> [N, C_out, H_out, W_out], exactly
    ``F.conv2d(x, synthesize(akp, weight, family), bias, stride, padding, dilation, groups)``."""
    layout = as_layout(family)
    conv = ConvArgs.make(stride, padding, dilation, groups)
    akp, weight, ks, cg = check_synthesis_inputs(akp, weight, layout, kernel_size)
    autocast_dtype = check_conv_inputs(x, akp, weight, layout, bias, conv, ks, cg)
    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, akp, weight, bias))
    problem = make_problem(akp, layout, ks, x, conv, autocast_dtype, requires_grad)
    return dispatch.select(backend, problem).conv2d(x, akp, weight, layout, bias, conv, ks)
