"""Double backward (a gradient differentiated again: gradient penalties, second-order
meta-learning, gradgradcheck) for the backends whose first-order backward runs their own kernels.

A backward that records a graph (create_graph=True) takes its steps as differentiable ops
(:func:`conv2d_gradients`; the native backend's C++ autograd does the same): W synthesized again,
the library convolution's backward, whose derivative is torch's, then the backend's synthesis
backward, recorded (:func:`synthesis_gradients`) as a node whose derivative is computed here. That
backward maps (grad_W, akp) to

    grad_akp = J(akp)^T grad_W        grad_weight = S^T grad_W

with J synthesis's Jacobian in akp and S the plain rows' place in W. A loss whose gradients w.r.t.
those outputs are (gg_akp, gg_weight) has, w.r.t. (grad_W, akp) taken as independent variables,
the gradients of

    L = <J(akp)^T grad_W, gg_akp> + <S^T grad_W, gg_weight>

taken with autograd through the reference synthesis, recorded, so that its derivative in akp brings
the families' second derivatives (SPEC's formulas). The results are differentiable again when the
caller records a graph, so third and higher orders work too. The native backend's kernels compute
the same in one pass of their own formulas in dual numbers where no graph is recorded
(``synthesize_backward_jvp``, csrc/dual.h).

Measured (python -m benchmarks.gradient_penalty: CPU, 2 threads, 64->64 3x3 on [4, 64, 28, 28],
default layout; benchmarks/RESULTS.md): a penalty on the input's and the parameters' gradients
costs 0.94-1.09x nn.Conv2d's step on native (1.53-2.20x before this design, the same day: the
weight gradient's convolution ran twice, and the reference's graph was built and walked where the
dual-number kernel now runs), the reference 1.31-1.88x; an R1 step (the input's gradient only)
0.88-1.06x on native, the reference 1.04-1.68x. synthesize_backward_jvp alone (2 threads): 0.47 ms
where this module's composite takes 20 ms.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import reference
from ..conv_args import ConvArgs
from ..layout import Layout
from ..validation import conv_weight_format
from . import library_conv

Tensor = torch.Tensor
#: (akp, weight) -> W [C_out, Cg, kH, kW], differentiable in both: the backend's synthesis.
Synthesize = Callable[[Tensor, Optional[Tensor]], Tensor]
#: (grad_W, need_akp, need_weight) -> (grad_akp, grad_weight), None where not needed: the backend's
#: synthesis backward, differentiable when the running backward records a graph (synthesis_gradients).
SynthesisGradients = Callable[[Tensor, bool, bool], tuple[Optional[Tensor], Optional[Tensor]]]


def _wrt(t: Optional[Tensor], record: bool) -> Optional[Tensor]:
    """t as an independent variable of L: a partial derivative in it must not run into t's own
    history (grad_W, for one, may depend on akp). An alias of t (a node of its own) when the caller
    records a graph through t, so that the result stays a function of t; a detached leaf otherwise.
    (With t itself, torch.autograd.grad would also walk t's history, into the very node whose
    backward is running: a deadlock on its mutex, besides a wrong total derivative.)"""
    if t is None:
        return None
    return t.view_as(t) if record and t.requires_grad else t.detach().requires_grad_()


def _synthesis_gradients_dot(akp: Tensor, layout: Layout, kernel_size: tuple[int, int], grad_W: Tensor,
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
        plain_rows = grad_W[layout.tensors(grad_W.device)["plain_channels"]]  # not index_select: see reference.py
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
        loss = _synthesis_gradients_dot(a, layout, tuple(grad_W.shape[2:]), g, gg_akp, gg_weight)
        return _gradients(loss, (g, a), needs, record)


def synthesis_gradients(first_order: Callable[[], tuple], grad_W: Tensor, akp: Tensor, layout: Layout) -> tuple:
    """(grad_akp, grad_weight) = ``first_order()`` (a backend's own kernels, computing the gradients
    of synthesis for grad_W), differentiable again when the running backward records a graph."""
    if torch.is_grad_enabled():
        return _SynthesisGradients.apply(grad_W, akp, first_order, layout)
    return first_order()


def conv2d_gradients(grad_y: Tensor, x: Tensor, akp: Tensor, weight: Optional[Tensor], synthesize: Synthesize,
                     synthesis_gradients_of: SynthesisGradients, conv: ConvArgs, kernel_size: tuple[int, int],
                     needs: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """(grad_x, grad_akp, grad_weight, grad_bias) of y = conv2d(x, synthesize(akp, weight), bias) for
    grad_y, None where ``needs`` is False: W synthesized again, the library convolution's backward,
    then ``synthesis_gradients_of``. When the running backward records a graph (create_graph) every
    step is recorded, so that autograd's own formulas give the double backward (the convolution's,
    torch's; synthesis's, the backend's) and nothing is computed twice."""
    need_x, need_akp, need_weight, need_bias = needs[:4]
    need_w = need_akp or need_weight
    grad_x, grad_w, grad_bias = library_conv.conv_backward(grad_y, x, synthesize(akp, weight), conv, kernel_size,
                                                           (need_x, need_w, need_bias), conv_weight_format(x, weight))
    grad_akp = grad_weight = None
    if need_w:
        grad_akp, grad_weight = synthesis_gradients_of(grad_w.to(akp.dtype), need_akp, need_weight)
    return grad_x, grad_akp, grad_weight, grad_bias


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
