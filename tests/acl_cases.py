"""Shared test cases: one acl_conv2d call (layout, shapes, nn.Conv2d arguments) on seeded data,
run through any backend and through the float64 oracle, with SPEC §6's tolerances."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from acl_fused import AnalyticConv2d, acl_conv2d
from acl_fused.conv_args import ConvArgs
from acl_fused.layout import Layout
from acl_fused.validation import Problem, make_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: SPEC §6 relative-norm bounds per dtype (float64: round-off; its real check is gradcheck).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class Case:
    """One acl_conv2d call: layout, C_in, kernel, input size and nn.Conv2d arguments."""

    id: str
    layout: list
    c_in: int
    kernel_size: tuple[int, int]
    hw: tuple[int, int] = (9, 8)
    batch: int = 2
    conv: dict = field(default_factory=dict)
    bias: bool = True

    def tensors(self, dtype: torch.dtype, seed: int = 0):
        """((x, akp, weight, bias) in ``dtype`` on DEVICE, layout): initialised as the module does,
        then the AKPs perturbed so that no family sits at its initial symmetric point."""
        torch.manual_seed(seed)
        m = AnalyticConv2d(self.c_in, len(self.layout), self.kernel_size, bias=self.bias, layout=self.layout,
                           dtype=torch.float64, **self.conv)
        akp = m.akp.detach() + 0.2 * torch.randn_like(m.akp)
        x = torch.randn(self.batch, self.c_in, *self.hw, dtype=torch.float64)
        tensors = (x, akp, m.weight, m.bias)
        return tuple(None if t is None else t.detach().to(device=DEVICE, dtype=dtype) for t in tensors), m.layout

    def problem(self, x: torch.Tensor, akp: torch.Tensor, layout: Layout) -> Problem:
        return make_problem(akp, layout, self.kernel_size, x, ConvArgs.make(**self.conv))

    def run(self, backend: str, x, akp, weight, bias, layout: Layout, grad_seed: int = 1):
        """(y, [grad x, akp, weight, bias]) for a fixed random output gradient (None where an input
        is absent)."""
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, akp, weight, bias)]
        y = acl_conv2d(leaves[0], leaves[1], leaves[2], layout, leaves[3], kernel_size=self.kernel_size,
                       backend=backend, **self.conv)
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
        present = [t for t in leaves if t is not None]
        # An all-plain layout's empty akp takes no part in the graph: its gradient is an empty zero.
        grads = iter(torch.autograd.grad(y, present, g.to(device=y.device, dtype=y.dtype), allow_unused=True,
                                         materialize_grads=True))
        return y, [None if t is None else next(grads) for t in leaves]

    def reference(self, x, akp, weight, bias, layout: Layout):
        """:meth:`run` of the oracle in float64 on the same values."""
        return self.run("reference", *(None if t is None else t.double() for t in (x, akp, weight, bias)), layout)
