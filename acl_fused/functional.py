"""Public functional API: validate once, pick a backend, run it."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

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
    return dispatch.select(backend, make_problem(akp, layout, ks)).synthesize(akp, weight, layout, ks)


def acl_conv2d(x: torch.Tensor, akp: Optional[torch.Tensor], weight: Optional[torch.Tensor], family: FamilyArg,
               bias: Optional[torch.Tensor] = None, stride: IntOrPair = 1, padding: PaddingArg = 0,
               dilation: IntOrPair = 1, groups: int = 1, kernel_size: Optional[IntOrPair] = None,
               backend: str = "auto") -> torch.Tensor:
    """ACL convolution: x [N, C_in, H, W] -> [N, C_out, H_out, W_out] (or unbatched [C_in, H, W] ->
    [C_out, H_out, W_out]), exactly
    ``F.conv2d(x, synthesize(akp, weight, family), bias, stride, padding, dilation, groups)``."""
    return conv2d(x, akp, weight, as_layout(family), bias, ConvArgs.make(stride, padding, dilation, groups),
                  kernel_size, backend)


def conv2d(x: torch.Tensor, akp: Optional[torch.Tensor], weight: Optional[torch.Tensor], layout: Layout,
           bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size: Optional[IntOrPair] = None,
           backend: str = "auto") -> torch.Tensor:
    """:func:`acl_conv2d` with the layout and convolution arguments already normalised (modules
    keep theirs, so a forward pass does not rebuild them). An unbatched x [C_in, H, W] gives
    [C_out, H_out, W_out], as in nn.Conv2d."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return conv2d(x.unsqueeze(0), akp, weight, layout, bias, conv, kernel_size, backend).squeeze(0)
    akp, weight, ks, name = checked_conv2d_call(x, akp, weight, layout, bias, conv, kernel_size, backend)
    return dispatch.backend_module(name).conv2d(x, akp, weight, layout, bias, conv, ks)


def bound_conv2d(name: str, layout: Layout, conv: ConvArgs, kernel_size: tuple[int, int], device: torch.device,
                 autocast: bool) -> Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                              Optional[torch.Tensor]], torch.Tensor]:
    """Backend ``name``'s conv2d as a function of (x, akp, weight, bias) for inputs that passed
    :func:`checked_conv2d_call`: prepared once by the backend's ``bind_conv2d`` where it has one
    and autocast is off, else calling its conv2d."""
    module = dispatch.backend_module(name)
    if not autocast and hasattr(module, "bind_conv2d"):
        return module.bind_conv2d(layout, conv, kernel_size, device)
    return lambda x, akp, weight, bias: module.conv2d(x, akp, weight, layout, bias, conv, kernel_size)


def checked_conv2d_call(x: torch.Tensor, akp: Optional[torch.Tensor], weight: Optional[torch.Tensor], layout: Layout,
                        bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size: Optional[IntOrPair] = None,
                        backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[int, int], str]:
    """Validates a :func:`conv2d` call and picks its backend: (akp, weight, kernel_size, backend
    name) as conv2d runs them (akp never None, weight None when there are no plain channels).
    Raises what conv2d raises for bad input."""
    akp, weight, ks, cg = check_synthesis_inputs(akp, weight, layout, kernel_size)
    autocast_dtype = check_conv_inputs(x, akp, weight, layout, bias, conv, ks, cg)
    problem = make_problem(akp, layout, ks, x, conv, autocast_dtype)
    return akp, weight, ks, dispatch.select_name(backend, problem)
