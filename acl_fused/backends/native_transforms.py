"""The native backend under torch.func's transforms (grad, vjp, jacrev, jvp, jacfwd, vmap).

The ops' C++ autograd (csrc/autograd.cpp) is a torch::autograd::Function, which functorch cannot
run. Under a transform, native synthesizes W through the Python Functions below instead and
convolves with torch's F.conv2d, which takes part in every transform itself. They call the same
C++ kernels: synthesize, synthesize_backward and, for the derivatives of synthesize_backward (a
gradient differentiated again) and for forward mode, synthesize_backward_jvp (families.h in dual
numbers). Their vmap rules fold the batch into the slices' input-channel axis (every (o, c) slice
is independent: SPEC §4), so a batch of parameter sets is one kernel call, not one per sample.

Derivatives of synthesize_backward_jvp itself (third and higher derivatives of W) are taken
through the reference formulas (torch.func on reference.synthesize_layout), as the C++ autograd
takes them (double_backward.py).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import reference
from ..conv_args import ConvArgs
from ..layout import Layout
from ..validation import conv_weight_format
from . import library_conv

Tensor = torch.Tensor
_ops = torch.ops.acl_fused


def synthesize(akp: Tensor, weight: Optional[Tensor], layout: Layout, kernel_size: tuple[int, int]) -> Tensor:
    """W [C_out, Cg, kH, kW], as native.synthesize, taking part in torch.func's transforms."""
    return _Synthesize.apply(akp, weight, layout, tuple(kernel_size))


def conv2d(x: Tensor, akp: Tensor, weight: Optional[Tensor], layout: Layout, bias: Optional[Tensor], conv: ConvArgs,
           kernel_size: tuple[int, int]) -> Tensor:
    """y = F.conv2d(x, W, bias, ...), as native.conv2d (autocast as nn.Conv2d), taking part in
    torch.func's transforms."""
    x, bias, scope = library_conv.autocast_inputs(x, bias)
    with scope:
        w = synthesize(akp, weight, layout, kernel_size)
        return library_conv.conv_forward(x, w, bias, conv, conv_weight_format(x, weight))


# -- batching: [B, rows, Cg, ...] <-> [rows, B * Cg, ...] ------------------------------------------
def _fold(t: Optional[Tensor], dim: Optional[int], batch: int) -> Optional[Tensor]:
    """t with its batch dimension (at ``dim``; None: unbatched, repeated) folded into the slices'
    input-channel axis: [B, rows, Cg, ...] -> [rows, B * Cg, ...]."""
    if t is None:
        return None
    t = t.unsqueeze(1) if dim is None else t.movedim(dim, 1)
    t = t.expand(t.shape[0], batch, *t.shape[2:])
    return t.reshape(t.shape[0], batch * t.shape[2], *t.shape[3:])


def _unfold(t: Tensor, batch: int) -> tuple[Tensor, Optional[int]]:
    """(t [rows, B, Cg, ...], batch dimension 1) from [rows, B * Cg, ...]; an empty [0] (a gradient
    not asked for) stays as it is, unbatched."""
    if t.dim() == 1:
        return t, None
    return t.unflatten(1, (batch, t.shape[1] // batch)), 1


def _indices(layout: Layout, t: Tensor) -> tuple[Tensor, Tensor]:
    idx = layout.tensors(t.device)
    return idx["family_i32"], idx["row_i32"]


class _Synthesize(torch.autograd.Function):
    """(akp, weight, layout, kernel_size) -> W."""

    @staticmethod
    def forward(akp: Tensor, weight: Optional[Tensor], layout: Layout, kernel_size: tuple[int, int]) -> Tensor:
        return _ops.synthesize(akp, weight, *_indices(layout, akp), list(kernel_size))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        akp, weight, ctx.layout, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(akp)
        ctx.save_for_forward(akp, output)
        ctx.has_weight = weight is not None

    @staticmethod
    def backward(ctx: Any, grad_W: Optional[Tensor]) -> tuple:
        (akp,) = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.has_weight and ctx.needs_input_grad[1])
        if grad_W is None or not any(mask):
            return None, None, None, None
        grad_akp, grad_weight = _SynthesizeBackward.apply(grad_W, akp, ctx.layout, mask)
        return grad_akp if mask[0] else None, grad_weight if mask[1] else None, None, None

    @staticmethod
    def jvp(ctx: Any, akp_tangent: Optional[Tensor], weight_tangent: Optional[Tensor], *_: Any) -> Tensor:
        akp, w = ctx.saved_tensors
        # W's own values stand in for grad_W, which the tangent of W alone does not read.
        return _SynthesizeBackwardJvp.apply(akp_tangent, weight_tangent, w, akp, ctx.layout, (True, False))[0]

    @staticmethod
    def vmap(info: Any, in_dims: tuple, akp: Tensor, weight: Optional[Tensor], layout: Layout,
             kernel_size: tuple[int, int]) -> tuple[Tensor, int]:
        akp_dim, weight_dim, _, _ = in_dims
        n = info.batch_size
        return _unfold(_Synthesize.apply(_fold(akp, akp_dim, n), _fold(weight, weight_dim, n), layout, kernel_size), n)


class _SynthesizeBackward(torch.autograd.Function):
    """(grad_W, akp, layout, output_mask) -> (grad_akp, grad_weight): empty [0] where not asked for."""

    @staticmethod
    def forward(grad_W: Tensor, akp: Tensor, layout: Layout, output_mask: tuple[bool, bool]) -> tuple[Tensor, Tensor]:
        return _ops.synthesize_backward(grad_W, akp, *_indices(layout, akp), list(output_mask))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        grad_W, akp, ctx.layout, ctx.output_mask = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_W, akp)
        ctx.save_for_forward(grad_W, akp)

    @staticmethod
    def backward(ctx: Any, gg_akp: Optional[Tensor], gg_weight: Optional[Tensor]) -> tuple:
        grad_W, akp = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        gg_akp = gg_akp if ctx.output_mask[0] else None
        gg_weight = gg_weight if ctx.output_mask[1] else None
        if not any(mask) or (gg_akp is None and gg_weight is None):
            return None, None, None, None
        grad_grad_W, grad_akp = _SynthesizeBackwardJvp.apply(gg_akp, gg_weight, grad_W, akp, ctx.layout, mask)
        return grad_grad_W if mask[0] else None, grad_akp if mask[1] else None, None, None

    @staticmethod
    def jvp(ctx: Any, grad_W_tangent: Optional[Tensor], akp_tangent: Optional[Tensor], *_: Any) -> tuple:
        grad_W, akp = ctx.saved_tensors
        mask = ctx.output_mask
        # Linear in grad_W: its tangent goes through synthesize_backward itself; akp's brings the
        # second derivatives along grad_W (synthesize_backward_jvp's grad_akp_tangent).
        grad_W_tangent = torch.zeros_like(grad_W) if grad_W_tangent is None else grad_W_tangent
        grad_akp, grad_weight = _SynthesizeBackward.apply(grad_W_tangent, akp, ctx.layout, mask)
        if akp_tangent is not None and mask[0]:
            grad_akp = grad_akp + _SynthesizeBackwardJvp.apply(akp_tangent, None, grad_W, akp, ctx.layout,
                                                               (False, True))[1]
        return grad_akp, grad_weight

    @staticmethod
    def vmap(info: Any, in_dims: tuple, grad_W: Tensor, akp: Tensor, layout: Layout,
             output_mask: tuple[bool, bool]) -> tuple[tuple[Tensor, Tensor], tuple[Optional[int], Optional[int]]]:
        grad_W_dim, akp_dim, _, _ = in_dims
        n = info.batch_size
        grads = _SynthesizeBackward.apply(_fold(grad_W, grad_W_dim, n), _fold(akp, akp_dim, n), layout, output_mask)
        (grad_akp, akp_out), (grad_weight, weight_out) = (_unfold(g, n) for g in grads)
        return (grad_akp, grad_weight), (akp_out, weight_out)


class _SynthesizeBackwardJvp(torch.autograd.Function):
    """(gg_akp, gg_weight, grad_W, akp, layout, output_mask) -> (grad_grad_W, grad_akp): the
    derivatives of synthesize_backward (its second derivatives are symmetric: its jvp gives them),
    empty [0] where not asked for. Its own derivatives come from :func:`_reference_jvp`."""

    @staticmethod
    def forward(gg_akp: Optional[Tensor], gg_weight: Optional[Tensor], grad_W: Tensor, akp: Tensor, layout: Layout,
                output_mask: tuple[bool, bool]) -> tuple[Tensor, Tensor]:
        return _ops.synthesize_backward_jvp(gg_akp, gg_weight, grad_W, akp, *_indices(layout, akp), list(output_mask))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        gg_akp, gg_weight, grad_W, akp, ctx.layout, ctx.output_mask = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gg_akp, gg_weight, grad_W, akp)
        ctx.save_for_forward(gg_akp, gg_weight, grad_W, akp)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple:
        primals = ctx.saved_tensors
        _, pullback = torch.func.vjp(_reference_jvp(ctx.layout, ctx.output_mask, primals), *_present(primals))
        cotangents = tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, _outputs_like(ctx, primals)))
        return (*_spread(pullback(cotangents), primals), None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Optional[Tensor]) -> tuple:
        primals = ctx.saved_tensors
        present = _present(primals)
        tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents) if p is not None)
        return torch.func.jvp(_reference_jvp(ctx.layout, ctx.output_mask, primals), present, tangents)[1]

    @staticmethod
    def vmap(info: Any, in_dims: tuple, gg_akp: Optional[Tensor], gg_weight: Optional[Tensor], grad_W: Tensor,
             akp: Tensor, layout: Layout, output_mask: tuple[bool, bool]
             ) -> tuple[tuple[Tensor, Tensor], tuple[Optional[int], Optional[int]]]:
        n = info.batch_size
        folded = (_fold(t, d, n) for t, d in zip((gg_akp, gg_weight, grad_W, akp), in_dims))
        out = _SynthesizeBackwardJvp.apply(*folded, layout, output_mask)
        (grad_grad_W, w_out), (grad_akp, akp_out) = (_unfold(t, n) for t in out)
        return (grad_grad_W, grad_akp), (w_out, akp_out)


def _present(primals: tuple) -> tuple[Tensor, ...]:
    return tuple(p for p in primals if p is not None)


def _spread(values: tuple, primals: tuple) -> tuple:
    """values (one per present primal) back in the places of primals, None for the absent ones."""
    it = iter(values)
    return tuple(None if p is None else next(it) for p in primals)


def _outputs_like(ctx: Any, primals: tuple) -> tuple[Tensor, Tensor]:
    """Empty tensors shaped as _SynthesizeBackwardJvp's outputs (for the gradients not given)."""
    _, _, grad_W, akp = primals
    return (grad_W.new_empty(grad_W.shape if ctx.output_mask[0] else (0,)),
            akp.new_empty(akp.shape if ctx.output_mask[1] else (0,)))


def _reference_jvp(layout: Layout, output_mask: tuple[bool, bool], primals: tuple):
    """_SynthesizeBackwardJvp's function of its present tensor inputs, through the reference formulas:
    grad_grad_W = J gg_akp + S gg_weight (W's tangent), grad_akp = (d/d akp J^T grad_W) gg_akp."""
    gg_akp_given, gg_weight_given = primals[0] is not None, primals[1] is not None

    def fn(*present: Tensor) -> tuple[Tensor, Tensor]:
        gg_akp, gg_weight, grad_W, akp = _spread(present, primals)
        kernel_size = tuple(grad_W.shape[2:])
        weight = None if not layout.num_plain else akp.new_zeros((layout.num_plain, akp.shape[1], *kernel_size))

        def w_of(a: Tensor, w: Optional[Tensor]) -> Tensor:
            return reference.synthesize_layout(a, w, layout, kernel_size)
        grad_grad_W = grad_W.new_empty((0,))
        if output_mask[0]:
            grad_grad_W = torch.zeros_like(grad_W)
            if gg_akp_given:
                grad_grad_W = grad_grad_W + torch.func.jvp(lambda a: w_of(a, weight), (akp,), (gg_akp,))[1]
            if gg_weight_given:
                grad_grad_W = grad_grad_W + torch.func.jvp(lambda w: w_of(torch.zeros_like(akp), w), (weight,),
                                                           (gg_weight,))[1]
        grad_akp = akp.new_empty((0,))
        if output_mask[1]:
            grad_akp = torch.zeros_like(akp)
            if gg_akp_given:
                def first_order(a: Tensor) -> Tensor:
                    return torch.func.vjp(lambda b: w_of(b, weight), a)[1](grad_W.to(akp.dtype))[0]
                grad_akp = grad_akp + torch.func.jvp(first_order, (akp,), (gg_akp,))[1]
        return grad_grad_W, grad_akp
    return fn
