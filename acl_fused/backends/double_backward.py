"""Double backward (a gradient differentiated again: gradient penalties, second-order
meta-learning, gradgradcheck) for the backends whose first-order backward runs their own kernels.

The backward of an ACL layer maps (grad_y, x, akp, weight) to

    grad_x = conv_input_grad(grad_y, W)       grad_akp    = J(akp)^T grad_W
    grad_W = conv_weight_grad(x, grad_y)      grad_weight = S^T grad_W        grad_bias = sum(grad_y)

with W = synthesis(akp, weight), J its Jacobian in akp and S the plain rows' place in W. A loss
whose gradients w.r.t. those outputs are (gg_x, gg_akp, gg_weight, gg_bias) has, w.r.t. (grad_y, x,
akp, weight) taken as independent variables, the gradients of

    L = <grad_y, conv(gg_x, W)> + <J(akp)^T grad_W, gg_akp> + <S^T grad_W, gg_weight> + <gg_bias, sum(grad_y)>

(the first term is <gg_x, grad_x> by the adjoint of the convolution). L's gradient is taken with
autograd: W from the backend's own differentiable synthesis; J(akp)^T grad_W from the reference
synthesis's autograd, recorded, so that its derivative in akp brings the families' second
derivatives (SPEC's formulas; no kernel computes them); grad_W by aten's convolution_backward,
differentiable in x and grad_y. Synthesis alone (W -> (grad_akp, grad_weight)) is the same with
L = <J(akp)^T grad_W, gg_akp> + <S^T grad_W, gg_weight>. The results are differentiable again when
the caller records a graph (create_graph), so third and higher orders work too.

Measured (python -m benchmarks.gradient_penalty: CPU, 2 threads, 64->64 3x3 on [4, 64, 28, 28],
default layout; benchmarks/RESULTS.md): an R1 step (input-gradient penalty) costs 1.05-1.14x
nn.Conv2d's on native, 1.35-1.40x on the reference; a penalty on the input and parameter gradients
1.75-1.86x, the reference 1.55-1.67x (whose first-order graph of the synthesis already exists; here
it is built again).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import reference
from ..conv_args import ConvArgs
from ..layout import Layout
from . import library_conv

Tensor = torch.Tensor
#: (akp, weight) -> W [C_out, Cg, kH, kW], differentiable in both: the backend's synthesis.
Synthesize = Callable[[Tensor, Optional[Tensor]], Tensor]


def _wrt(t: Optional[Tensor], record: bool) -> Optional[Tensor]:
    """t as an independent variable of L: a partial derivative in it must not run into t's own
    history (grad_y, for one, may depend on akp). An alias of t (a node of its own) when the caller
    records a graph through t, so that the result stays a function of t; a detached leaf otherwise.
    (With t itself, torch.autograd.grad would also walk t's history, into the very node whose
    backward is running: a deadlock on its mutex, besides a wrong total derivative.)"""
    if t is None:
        return None
    return t.view_as(t) if record and t.requires_grad else t.detach().requires_grad_()


def synthesis_gradients_dot(akp: Tensor, layout: Layout, kernel_size: tuple[int, int], grad_W: Tensor,
                            gg_akp: Optional[Tensor], gg_weight: Optional[Tensor]) -> Tensor:
    """<J(akp)^T grad_W, gg_akp> + <S^T grad_W, gg_weight> (zero when both are None): a loss's use of
    the synthesis gradients, as a function of akp (which must require grad) and grad_W, J^T grad_W
    being the reference's first-order gradient, recorded."""
    dot = grad_W.new_zeros(())
    if gg_akp is not None:
        weight = None if not layout.num_plain else akp.new_zeros((layout.num_plain, akp.shape[1], *kernel_size))
        w = reference.synthesize_layout(akp, weight, layout, kernel_size)
        (grad_akp,) = torch.autograd.grad(w, akp, grad_W.to(w.dtype), create_graph=True)
        dot = dot + (grad_akp * gg_akp).sum()
    if gg_weight is not None:
        plain_rows = grad_W.index_select(0, layout.tensors(grad_W.device)["plain_channels"])
        dot = dot + (plain_rows * gg_weight).sum()
    return dot


def _gradients(loss: Tensor, wrt: Sequence[Optional[Tensor]], needs: Sequence[bool],
               record: bool) -> tuple[Optional[Tensor], ...]:
    """loss's gradient w.r.t. each tensor of ``wrt`` that ``needs`` it (zeros where loss does not
    depend on it, e.g. no gradient came in at all), None for the others."""
    asked = [t for t, need in zip(wrt, needs) if need and t is not None]
    grads = iter(torch.autograd.grad(loss, asked, create_graph=record, allow_unused=True, materialize_grads=True)
                 if loss.requires_grad and asked else [torch.zeros_like(t) for t in asked])
    return tuple(next(grads) if need and t is not None else None for t, need in zip(wrt, needs))


def synthesize_double_backward(grad_W: Tensor, akp: Tensor, layout: Layout, gg_akp: Optional[Tensor],
                               gg_weight: Optional[Tensor], needs: Sequence[bool]
                               ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. (grad_W, akp) of a loss whose gradients w.r.t. synthesis's backward outputs
    (grad_akp, grad_weight) are (gg_akp, gg_weight); None where ``needs`` (grad_W, akp) is False."""
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        g, a = _wrt(grad_W, record), _wrt(akp, record)
        loss = synthesis_gradients_dot(a, layout, tuple(grad_W.shape[2:]), g, gg_akp, gg_weight)
        return _gradients(loss, (g, a), needs, record)


def conv2d_double_backward(synthesize: Synthesize, grad_y: Tensor, x: Tensor, akp: Tensor,
                           weight: Optional[Tensor], layout: Layout, kernel_size: tuple[int, int],
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                           gg_x: Optional[Tensor], gg_akp: Optional[Tensor], gg_weight: Optional[Tensor],
                           gg_bias: Optional[Tensor], needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """Gradients w.r.t. (grad_y, x, akp, weight) of a loss whose gradients w.r.t. the layer's
    backward outputs (grad_x, grad_akp, grad_weight, grad_bias) are (gg_x, gg_akp, gg_weight,
    gg_bias) (None: the loss does not use it); None where ``needs`` is False. ``padding`` is explicit
    (top, bottom, left, right); the convolutions run in x's dtype."""
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        gy, xs, a, w = (_wrt(t, record) for t in (grad_y, x, akp, weight))
        loss = gy.new_zeros(())
        if gg_x is not None:
            gg_x_p, symmetric = library_conv.pad_unequal_sides(gg_x, padding)
            conv = F.conv2d(gg_x_p, synthesize(a, w).to(gg_x.dtype), None, stride, symmetric, dilation, groups)
            loss = loss + (gy * conv).sum()
        if gg_akp is not None or gg_weight is not None:
            x_p, symmetric = library_conv.pad_unequal_sides(xs, padding)
            w_shape = [layout.out_channels, akp.shape[1], *kernel_size]
            grad_W = torch.ops.aten.convolution_backward(
                gy, x_p, xs.new_empty(w_shape), None, stride, symmetric, dilation, False, [0, 0], groups,
                [False, True, False])[1]
            loss = loss + synthesis_gradients_dot(a, layout, kernel_size, grad_W, gg_akp, gg_weight)
        if gg_bias is not None:
            loss = loss + (gg_bias * gy.sum((0, 2, 3))).sum()
        return _gradients(loss, (gy, xs, a, w), needs, record)


def synthesis_gradients(first_order: Callable[[], tuple], grad_W: Tensor, akp: Tensor, layout: Layout) -> tuple:
    """(grad_akp, grad_weight) = ``first_order()`` (a backend's own kernels, computing the gradients
    of synthesis for grad_W), differentiable again when the running backward records a graph."""
    if torch.is_grad_enabled():
        return _SynthesisGradients.apply(grad_W, akp, first_order, layout)
    return first_order()


def conv2d_gradients(first_order: Callable[[], tuple], grad_y: Tensor, x: Tensor, akp: Tensor,
                     weight: Optional[Tensor], synthesize: Synthesize, layout: Layout, conv: ConvArgs,
                     kernel_size: tuple[int, int]) -> tuple:
    """(grad_x, grad_akp, grad_weight, grad_bias) = ``first_order()`` (a backend's own kernels,
    computing the layer's gradients for grad_y), differentiable again when the running backward
    records a graph."""
    if torch.is_grad_enabled():
        return _Conv2dGradients.apply(grad_y, x, akp, weight, first_order, synthesize, layout, conv, kernel_size)
    return first_order()


class _SynthesisGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_W: Tensor, akp: Tensor, first_order: Callable[[], tuple], layout: Layout):
        ctx.set_materialize_grads(False)  # a gradient not given is a term skipped
        ctx.save_for_backward(grad_W, akp)
        ctx.layout = layout
        return first_order()

    @staticmethod
    def backward(ctx, gg_akp: Optional[Tensor], gg_weight: Optional[Tensor]):
        grad_W, akp = ctx.saved_tensors
        grads = synthesize_double_backward(grad_W, akp, ctx.layout, gg_akp, gg_weight, ctx.needs_input_grad[:2])
        return (*grads, None, None)


class _Conv2dGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_y: Tensor, x: Tensor, akp: Tensor, weight: Optional[Tensor],
                first_order: Callable[[], tuple], synthesize: Synthesize, layout: Layout, conv: ConvArgs,
                kernel_size: tuple[int, int]):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, akp, weight)
        ctx.synthesize, ctx.layout, ctx.conv, ctx.kernel_size = synthesize, layout, conv, kernel_size
        return first_order()

    @staticmethod
    def backward(ctx, gg_x: Optional[Tensor], gg_akp: Optional[Tensor], gg_weight: Optional[Tensor],
                 gg_bias: Optional[Tensor]):
        grad_y, x, akp, weight = ctx.saved_tensors
        conv, ks = ctx.conv, ctx.kernel_size
        grads = conv2d_double_backward(ctx.synthesize, grad_y, x, akp, weight, ctx.layout, ks, conv.stride,
                                       conv.explicit_padding(ks), conv.dilation, conv.groups,
                                       gg_x, gg_akp, gg_weight, gg_bias, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None)
