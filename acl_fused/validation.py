"""Input checks shared by every entry point, and the :class:`Problem` that dispatch reasons about.

Every check raises a Python exception that names the offending argument, so a bad call never
reaches a kernel (or a cryptic shape error deep inside ATen).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch._prims_common import suggest_memory_format  # ATen's rule, as torch's fake kernels use it

from .conv_args import ConvArgs, pair
from .families import AKP_SLOTS
from .layout import Layout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can run (see dispatch.py).

    ``conv`` and ``input_shape`` are None for synthesis alone. ``autocast_dtype`` is the
    low-precision dtype the convolution runs in under autocast (synthesis stays in ``dtype``).
    """

    device: torch.device
    dtype: torch.dtype
    kernel_size: tuple[int, int]
    layout: Layout
    conv: Optional[ConvArgs] = None
    input_shape: Optional[tuple[int, ...]] = None
    autocast_dtype: Optional[torch.dtype] = None
    #: the torch.func transforms running the call: "grad" (grad, vjp, jacrev), "jvp" (jvp, jacfwd,
    #: torch.autograd.forward_ad), "vmap", "functionalize"; "nested jvp" where forward mode runs
    #: inside forward mode (higher forward-mode derivatives); COMPILED_TRANSFORM while torch.compile
    #: traces a call inside any of them (Dynamo shows the transforms' stack, not their kinds)
    functorch: frozenset[str] = frozenset()


#: Problem.functorch's kind for a torch.func transform that torch.compile traces.
COMPILED_TRANSFORM = "compiled"


def functorch_transforms() -> frozenset[str]:
    """The torch.func transforms running this call (see Problem.functorch). While torch.compile
    traces, Dynamo runs the transforms over the traced ops itself and folds only the depth of the
    transforms' stack to a constant (``get_interpreter_stack`` breaks the graph; a None from
    ``peek_interpreter_stack`` reads as not None there): any transform is then COMPILED_TRANSFORM."""
    if torch.compiler.is_compiling():
        return frozenset({COMPILED_TRANSFORM}) if torch._C._functorch.get_dynamic_layer_stack_depth() else frozenset()
    levels = [level.key().name.lower() for level in torch._C._functorch.get_interpreter_stack() or ()]
    # torch.autograd.forward_ad's dual level is forward mode too (torch.func.jvp opens one of its own)
    if forward_ad._current_level >= 0 and "jvp" not in levels:
        levels.append("jvp")
    return frozenset(levels + (["nested jvp"] if levels.count("jvp") > 1 else []))


def suggests_channels_last(t: torch.Tensor) -> bool:
    """Whether ATen's ``suggest_memory_format`` reads ``t`` (4-D) as channels_last: laid out so, and
    for a tensor that is also contiguous (a [C_out, C_in, 1, 1] weight after
    ``.to(memory_format=torch.channels_last)``) by its strides. torch's convolutions pick their
    layout from this of their input and weight. Under torch.jit.trace, whose sizes are traced
    tensors, the layout flags alone decide: a tensor that is both reads as contiguous there (a
    traced 1x1 layer moved to channels_last follows its input)."""
    if t.dim() != 4:
        return False
    if torch.jit.is_tracing():
        return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return suggest_memory_format(t) == torch.channels_last


def conv_weight_format(x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.memory_format:
    """The memory format W is synthesized in: channels_last where the input or the plain weight
    suggests it (:func:`suggests_channels_last`), else contiguous. With W in it torch's convolution
    lays out the output (and the input gradient) as nn.Conv2d's with that input and a weight in the
    plain weight's format: after ``layer.to(memory_format=torch.channels_last)`` the output is
    channels_last for a contiguous input too. A layer without plain channels follows its input."""
    if suggests_channels_last(x) or (weight is not None and suggests_channels_last(weight)):
        return torch.channels_last
    return torch.contiguous_format


def laid_out(w: torch.Tensor, memory_format: torch.memory_format, dtype: Optional[torch.dtype] = None
             ) -> torch.Tensor:
    """W in ``memory_format`` (:func:`conv_weight_format`) and ``dtype`` (None: its own) for the
    convolution, as nn.Conv2d's weight would be; under ``vmap`` a W that cannot take the format keeps
    its layout: batched (model ensembles), or with a batched tangent (jacfwd, Hessians), its
    physical rank is 5, and nn.Conv2d sets no layout there. While torch.compile traces a transform,
    where the tensors cannot be asked, W keeps its layout."""
    if torch._C._functorch.peek_interpreter_stack() is None and not torch.compiler.is_compiling():
        return w.to(dtype=dtype, memory_format=memory_format)   # no transform: the common case, no stack read
    transforms = functorch_transforms()
    if COMPILED_TRANSFORM in transforms:
        return w.to(dtype=dtype)
    try:
        return w.to(dtype=dtype, memory_format=memory_format)
    except RuntimeError as e:   # torch cannot tell beforehand whether a wrapped tensor's parts are batched
        if "vmap" not in transforms or "rank 4" not in str(e):
            raise
        return w.to(dtype=dtype)


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (False for device types autocast does not know, such as
    meta, where asking would raise)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs a convolution of input ``x`` in, or None: autocast is off on x's
    device, or x is float64, which autocast leaves alone (nn.Conv2d then runs in float64)."""
    if not torch._C._is_any_autocast_enabled():  # one call instead of three when autocast is off
        return None
    return torch.get_autocast_dtype(x.device.type) if autocast_enabled(x.device) and x.dtype != torch.float64 else None


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_synthesis_inputs(akp: Optional[torch.Tensor], weight: Optional[torch.Tensor], layout: Layout,
                           kernel_size=None) -> tuple[torch.Tensor, Optional[torch.Tensor], tuple[int, int], int]:
    """Validate akp [A, Cg, 6], weight [P, Cg, kH, kW] against the layout.

    Returns (akp, weight-or-None, kernel_size, Cg); akp is never None on return (an empty
    [0, Cg, 6] tensor stands for "no analytic channels"), weight is None when P = 0.
    """
    if akp is None and weight is None:
        raise ValueError("at least one of akp and weight must be given")
    if akp is not None:
        _check_float(akp, "akp")
        if akp.dim() != 3:
            raise ValueError(f"akp must have shape [A, C_in/groups, {AKP_SLOTS}], got {tuple(akp.shape)}")
        if akp.shape[2] != AKP_SLOTS:
            raise ValueError(f"akp's last dimension must be {AKP_SLOTS} (packed AKP slots), got {akp.shape[2]}")
    if weight is not None:
        _check_float(weight, "weight")
        if weight.dim() != 4:
            raise ValueError(f"weight must have shape [P, C_in/groups, kH, kW], got {tuple(weight.shape)}")
    a_rows = 0 if akp is None else akp.shape[0]
    p_rows = 0 if weight is None else weight.shape[0]
    if a_rows != layout.num_analytic:
        raise ValueError(f"akp has {a_rows} rows but the layout has {layout.num_analytic} analytic channels")
    if p_rows != layout.num_plain:
        raise ValueError(f"weight has {p_rows} rows but the layout has {layout.num_plain} plain channels")
    if akp is not None and weight is not None:
        if akp.shape[1] != weight.shape[1]:
            raise ValueError(f"akp and weight disagree on C_in/groups: {akp.shape[1]} vs {weight.shape[1]}")
        if akp.dtype != weight.dtype:
            raise TypeError(f"akp and weight must have the same dtype, got {akp.dtype} and {weight.dtype}")
        if akp.device != weight.device:
            raise ValueError(f"akp and weight must be on the same device, got {akp.device} and {weight.device}")
    if weight is not None:
        ks = (weight.shape[2], weight.shape[3])
        if min(ks) < 1:
            raise ValueError(f"weight's kernel must be at least 1x1, got {ks}")
        if kernel_size is not None and pair(kernel_size, "kernel_size", 1) != ks:
            raise ValueError(f"kernel_size {kernel_size!r} disagrees with weight's kernel {ks}")
        if weight.shape[0] == 0:  # an empty weight still says the kernel size; backends get None
            weight = None
    else:
        if kernel_size is None:
            raise ValueError("kernel_size is required when there are no plain channels (weight is None)")
        ks = pair(kernel_size, "kernel_size", 1)
    cg = weight.shape[1] if weight is not None else akp.shape[1]
    if akp is None:
        akp = weight.new_zeros((0, cg, AKP_SLOTS))
    return akp, weight, ks, cg


def check_conv_inputs(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], layout: Layout,
                      bias: Optional[torch.Tensor], conv: ConvArgs, kernel_size, cg: int) -> torch.dtype | None:
    """Validate the convolution's input and bias. Returns the autocast dtype in force, if any."""
    _check_float(x, "input")
    if x.dim() not in (3, 4):
        raise ValueError(f"input must have shape [N, C_in, H, W] or [C_in, H, W], got {tuple(x.shape)}")
    c_out = layout.out_channels
    if c_out % conv.groups != 0:
        raise ValueError(f"out_channels ({c_out}) must be divisible by groups ({conv.groups})")
    if x.shape[-3] != cg * conv.groups:
        raise ValueError(f"input has {x.shape[-3]} channels but the layer expects C_in = C_in/groups * groups "
                         f"= {cg} * {conv.groups} = {cg * conv.groups}")
    if x.device != akp.device:
        raise ValueError(f"input and parameters must be on the same device, got {x.device} and {akp.device}")
    if bias is not None:
        _check_float(bias, "bias")
        if bias.shape != (c_out,):
            raise ValueError(f"bias must have shape [{c_out}], got {tuple(bias.shape)}")
        if bias.device != akp.device:
            raise ValueError(f"bias must be on the parameters' device {akp.device}, got {bias.device}")
        if bias.dtype != akp.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from the parameters' dtype {akp.dtype}")
    amp_dtype = autocast_dtype(x)
    if amp_dtype is None and x.dtype != akp.dtype:
        raise TypeError(f"input dtype {x.dtype} differs from the parameters' dtype {akp.dtype} "
                        "(use the same dtype, or autocast)")
    if amp_dtype is not None and akp.dtype == torch.float64:
        raise TypeError(f"float64 parameters with a {x.dtype} input under autocast: autocast leaves float64 "
                        f"tensors as they are, so the convolution would mix {amp_dtype} and float64 (nn.Conv2d "
                        "raises too); use a float64 input, or float32 parameters")
    top, bottom, left, right = conv.explicit_padding(kernel_size)
    for n, p, k, d, axis in ((x.shape[-2], top + bottom, kernel_size[0], conv.dilation[0], "height"),
                             (x.shape[-1], left + right, kernel_size[1], conv.dilation[1], "width")):
        if n + p < d * (k - 1) + 1:
            raise ValueError(f"input {axis} {n} (+{p} padding) is smaller than the dilated kernel "
                             f"({d * (k - 1) + 1})")
    return amp_dtype


def make_problem(akp: torch.Tensor, layout: Layout, kernel_size: tuple[int, int], x: Optional[torch.Tensor] = None,
                 conv: Optional[ConvArgs] = None, autocast_dtype: Optional[torch.dtype] = None) -> Problem:
    return Problem(device=akp.device, dtype=akp.dtype, kernel_size=kernel_size, layout=layout, conv=conv,
                   input_shape=None if x is None else tuple(x.shape), autocast_dtype=autocast_dtype,
                   functorch=functorch_transforms())
