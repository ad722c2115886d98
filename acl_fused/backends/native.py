"""The native backend: C++ / CUDA kernels registered as ``torch.ops.acl_fused`` ops (csrc/).

Ops (schemas in csrc/ops.cpp; ``family`` / ``row`` are a Layout's int32 [C_out] ``family_i32`` /
``row_i32``, ``padding`` is explicit (top, bottom, left, right)):

    synthesize(akp [A, Cg, 6], weight [P, Cg, kH, kW] | None, family, row, kernel_size)
        -> W [C_out, Cg, kH, kW]                                   one parallel loop / launch
    synthesize_backward(grad_W, akp, family, row, output_mask[2])
        -> (grad_akp [A, Cg, 6], grad_weight [P, Cg, kH, kW])      one pass over grad_W
    acl_conv2d(input, akp, weight, family, row, bias, kernel_size, stride, padding, dilation, groups)
        -> y                                                       synthesis + ATen convolution
    acl_conv2d_backward(grad_output, input, akp, weight, family, row, kernel_size, stride, padding,
                        dilation, groups, output_mask[4]) -> (grad_input, grad_akp, grad_weight, grad_bias)

This module loads the extension and gives every op a fake kernel (torch.compile, meta tensors).
Autograd is C++ (csrc/autograd.cpp, the Autograd key): ``synthesize`` / ``acl_conv2d`` save
(input, akp, weight) only and recompute W in the backward; the ops refuse forward-mode AD with a
clear error (under torch.func's transforms and forward-mode AD this backend runs
native_transforms.py's Python Functions around the same kernels instead). A backward that records
a graph (create_graph) runs as differentiable steps (synthesize, ATen's convolution_backward,
synthesize_backward); synthesize_backward's own backward (double
backward) is one pass of the kernels' formulas in dual numbers, or, when it records a graph too
(third order), a composite op this module implements (double_backward.py):

    synthesize_backward_jvp(akp_tangent?, weight_tangent?, grad_W, akp, family, row, output_mask[2])
        -> (W_tangent, grad_akp_tangent)                           = double backward's (grad_grad_W, grad_akp)
    synthesize_double_backward(gg_akp?, gg_weight?, grad_W, akp, family, row, output_mask[2])
        -> (grad_grad_W, grad_akp)                                 autograd through the reference
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import conv_flop_count

from ..conv_args import ConvArgs
from ..layout import Layout
from ..validation import FLOAT_DTYPES, Problem, conv_weight_format, functorch_transforms
from . import double_backward, library_conv, native_transforms

BUILD_HINT = ("build it from the repository root with `pip install --no-build-isolation -e .` (or `make setup`), "
              "without ACL_FUSED_NO_EXT=1")


def _load_extension() -> Optional[str]:
    """Imports acl_fused._C (which registers the ops); the reason it cannot be used, or None."""
    try:
        importlib.import_module("acl_fused._C")
    except (ImportError, OSError) as e:
        return f"the compiled extension acl_fused._C is not available ({e}); {BUILD_HINT}"
    return None


#: Why the extension cannot be used (None when it loaded).
EXTENSION_ERROR: Optional[str] = _load_extension()


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "acl_fused::synthesize", "CUDA")


# -- backend protocol (acl_fused/dispatch.py) -------------------------------------------------
def why_not(problem: Problem) -> Optional[str]:
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    device = problem.device.type
    if device == "cuda" and not has_cuda_kernels():
        return ("acl_fused._C was built without its CUDA kernels (CPU only); rebuild where a CUDA toolkit and a "
                "CUDA build of torch are present: `ACL_FUSED_CUDA=1 pip install --no-build-isolation -e .`")
    if "functionalize" in problem.functorch and not problem.functorch <= {"functionalize"}:
        return ("torch.func.functionalize is running together with grad / jvp / vmap, under which this backend runs "
                "torch.autograd.Functions that torch cannot functionalize yet; the reference backend can")
    if device not in ("cpu", "cuda"):
        return f"no native kernels for {device!r} tensors (CPU and CUDA only)"
    if problem.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        return f"unsupported parameter dtype {problem.dtype} (native kernels take {names})"
    return None


def synthesize(akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
               kernel_size: tuple[int, int]) -> torch.Tensor:
    """W [C_out, Cg, kH, kW] in akp's dtype (half / bfloat16: computed in float32, rounded once)."""
    _require_extension()
    if _transformed():
        return native_transforms.synthesize(akp, weight, layout, kernel_size)
    idx = layout.tensors(akp.device)
    return torch.ops.acl_fused.synthesize(akp, weight, idx["family_i32"], idx["row_i32"], list(kernel_size))


def conv2d(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
           bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size: tuple[int, int]) -> torch.Tensor:
    """y = F.conv2d(x, W, bias, ...) [N, C_out, H_out, W_out]; under autocast W is synthesized in the
    parameters' dtype and the convolution runs in the autocast dtype, like nn.Conv2d."""
    if _transformed():
        return native_transforms.conv2d(x, akp, weight, layout, bias, conv, kernel_size)
    x, bias, scope = library_conv.autocast_inputs(x, bias)
    with scope:
        return bind_conv2d(layout, conv, kernel_size, akp.device)(x, akp, weight, bias)


def bind_conv2d(layout: Layout, conv: ConvArgs, kernel_size: tuple[int, int], device: torch.device
                ) -> Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]],
                              torch.Tensor]:
    """The acl_conv2d op as a function of (x, akp, weight, bias), its other arguments converted
    once: what a module's call plan keeps between calls (without autocast; conv2d casts for it).
    Measured in a training step of AnalyticConv2d(64, 128, 1, stride=2) (CPU, 2 threads): the
    conversions cost ~10 us a call there, several times what they cost timed alone."""
    _require_extension()
    if _transformed():
        return lambda x, akp, weight, bias: native_transforms.conv2d(x, akp, weight, layout, bias, conv, kernel_size)
    idx = layout.tensors(device)
    constant = (list(kernel_size), list(conv.stride), list(conv.explicit_padding(kernel_size)),
                list(conv.dilation), conv.groups)
    family, row, op = idx["family_i32"], idx["row_i32"], torch.ops.acl_fused.acl_conv2d.default

    def acl_conv2d(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
        return op(x, akp, weight, family, row, bias, *constant)
    return acl_conv2d


def _transformed() -> bool:
    """Whether torch.func's grad, jvp or vmap transform (or forward-mode AD) is running: then the
    ops' C++ autograd cannot take part, and native_transforms' Functions do."""
    return not functorch_transforms() <= {"functionalize"}


def _require_extension() -> None:
    if EXTENSION_ERROR is not None:
        raise RuntimeError(EXTENSION_ERROR)


# -- fake kernels: shapes, dtypes and strides exactly as the C++ kernels give them ----------------
def _w_shape(akp_shape, family_shape, kernel_size) -> list[int]:
    """W's shape [C_out, C_in/g, kH, kW] from akp's [A, C_in/g, 6] and family's [C_out]."""
    return [family_shape[0], akp_shape[1], *kernel_size]


def _fake_synthesize(akp, weight, family, row, kernel_size):
    return akp.new_empty(_w_shape(akp.shape, family.shape, kernel_size))


def _fake_synthesize_backward(grad_W, akp, family, row, output_mask):
    grad_akp = akp.new_empty(akp.shape) if output_mask[0] else akp.new_empty((0,))
    grad_weight = (akp.new_empty((family.shape[0] - akp.shape[0], akp.shape[1], *grad_W.shape[2:]))
                   if output_mask[1] else akp.new_empty((0,)))
    return grad_akp, grad_weight


def _fake_synthesize_backward_jvp(akp_tangent, weight_tangent, grad_W, akp, family, row, output_mask):
    return (grad_W.new_empty(grad_W.shape if output_mask[0] else (0,)),
            akp.new_empty(akp.shape if output_mask[1] else (0,)))


def _fake_w(input, akp, weight, family, kernel_size):
    """W as the C++ kernels make it for the convolution: input's dtype, csrc/acl_conv2d.cpp weight_format."""
    return torch.empty(_w_shape(akp.shape, family.shape, kernel_size), dtype=input.dtype, device=input.device,
                       memory_format=conv_weight_format(input, weight))


def _fake_acl_conv2d(input, akp, weight, family, row, bias, kernel_size, stride, padding, dilation, groups):
    w = _fake_w(input, akp, weight, family, kernel_size)
    x, symmetric = library_conv.pad_unequal_sides(input, padding)
    return torch.ops.aten.convolution(x, w, bias, stride, symmetric, dilation, False, [0, 0], groups)


def _fake_acl_conv2d_backward(grad_output, input, akp, weight, family, row, kernel_size, stride, padding,
                              dilation, groups, output_mask):
    want_input, want_akp, want_weight, want_bias = output_mask
    grad_input, grad_bias = input.new_empty((0,)), input.new_empty((0,))
    if want_input or want_bias:
        w = _fake_w(input, akp, weight, family, kernel_size)
        x, symmetric = library_conv.pad_unequal_sides(input, padding)
        gx, _, gb = torch.ops.aten.convolution_backward(
            grad_output.to(input.dtype), x, w, [family.shape[0]] if want_bias else None, stride, symmetric,
            dilation, False, [0, 0], groups, [want_input, False, want_bias])
        if want_input:
            # the C++ kernel's layout (csrc/acl_conv2d.cpp), which torch.compile plans with
            grad_input = gx if x is input else library_conv.unpadded_gradient(gx, input, padding, symmetric)
        if want_bias:
            grad_bias = gb
    grad_akp, grad_weight = _fake_synthesize_backward(
        grad_output.new_empty(_w_shape(akp.shape, family.shape, kernel_size)), akp, family, row,
        [want_akp, want_weight])
    if want_weight and weight is not None:
        grad_weight = torch.empty_like(weight)  # the parameter's layout (csrc/acl_conv2d.cpp laid_out_like)
    return grad_input, grad_akp, grad_weight, grad_bias


def _register_fake_kernels() -> None:
    for name, fake in (("synthesize", _fake_synthesize), ("synthesize_backward", _fake_synthesize_backward),
                       ("synthesize_backward_jvp", _fake_synthesize_backward_jvp),
                       ("acl_conv2d", _fake_acl_conv2d), ("acl_conv2d_backward", _fake_acl_conv2d_backward)):
        torch.library.register_fake("acl_fused::" + name, fake)


# -- FLOP counts: torch.utils.flop_counter.FlopCounterMode counts the ops' convolutions as it counts
# nn.Conv2d's (its conv formulas on W's shape); synthesis, elementwise work, is not counted.
def _acl_conv2d_flops(input_shape, akp_shape, weight_shape, family_shape, row_shape, bias_shape, kernel_size,
                      *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(input_shape, _w_shape(akp_shape, family_shape, kernel_size), out_shape)


def _acl_conv2d_backward_flops(grad_output_shape, input_shape, akp_shape, weight_shape, family_shape, row_shape,
                               kernel_size, stride, padding, dilation, groups, output_mask, out_shape=None,
                               **kwargs) -> int:
    """aten.convolution_backward's count: the input gradient's convolution where asked for, the weight
    gradient's where the AKP or plain-weight gradient is."""
    w_shape = _w_shape(akp_shape, family_shape, kernel_size)
    flops = conv_flop_count(grad_output_shape, w_shape, input_shape, transposed=True) if output_mask[0] else 0
    if output_mask[1] or output_mask[2]:
        def t(shape):
            return [shape[1], shape[0], *shape[2:]]
        flops += conv_flop_count(t(input_shape), t(grad_output_shape), t(w_shape))
    return flops


def _register_flop_formulas() -> None:
    for op, formula in ((torch.ops.acl_fused.acl_conv2d, _acl_conv2d_flops),
                        (torch.ops.acl_fused.acl_conv2d_backward, _acl_conv2d_backward_flops)):
        if op not in flop_counter.flop_registry:  # a second import (importlib.reload) registers nothing
            flop_counter.register_flop_formula(op)(formula)


# -- double backward: the composite op csrc/autograd.cpp calls where a double backward records a graph
def _layout_of(family: torch.Tensor, row: torch.Tensor) -> Layout:
    """The Layout whose family_i32 / row_i32 these are (read on the host: double backward only)."""
    layout = Layout(family.tolist())
    if list(layout.row) != row.tolist():
        raise ValueError("acl_fused: double backward needs row = the layout's row of each output channel "
                         "(Layout.tensors()['row_i32']), got another mapping")
    return layout


def _or_empty(grads: tuple[Optional[torch.Tensor], ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ops' convention: a gradient not asked for is an empty tensor [0]."""
    return tuple(like.new_empty((0,)) if g is None else g for g in grads)


def _synthesize_double_backward(gg_akp, gg_weight, grad_W, akp, family, row, output_mask):
    grads = double_backward.synthesize_double_backward(grad_W, akp, _layout_of(family, row), gg_akp, gg_weight,
                                                       output_mask)
    return _or_empty(grads, akp)


def _register_double_backward() -> None:
    qualname = "acl_fused::synthesize_double_backward"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeImplicitAutograd"):  # reload
        torch.library.impl(qualname, "CompositeImplicitAutograd", _synthesize_double_backward)


if EXTENSION_ERROR is None:
    _register_fake_kernels()
    _register_flop_formulas()
    _register_double_backward()
