"""AnalyticConv2d: an nn.Conv2d drop-in whose output channels are a mosaic of families."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .conv_args import ConvArgs, IntOrPair, PaddingArg, pair, positive_int
from .families import AKP_COUNT, AKP_NAMES, AKP_SLOTS, Family, pos, pos_inverse
from .layout import Layout, LayoutSpec, describe_counts, make_layout
from .reference import synthesize_layout
from .validation import autocast_dtype, functorch_transforms, suggests_channels_last

#: nn.Conv2d's padding modes.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class AnalyticConv2d(nn.Module):
    """ACL layer (SPEC §5) with nn.Conv2d's constructor and semantics.

    Parameters: ``akp`` [A, C_in/g, 6] raw AKPs of the analytic channels, ``weight``
    [P, C_in/g, kH, kW] plain kernels (None when P = 0), ``bias`` [C_out] (None when bias=False).
    Buffer: ``family`` [C_out] int64 codes: the layout as the state dict saves it. The layer computes
    with its ``layout``; writes into the buffer (buffer averaging, as EMA's) do not change it, a state
    dict always saves the layout, and a buffer passed in for it (torch.func.functional_call, ensembles)
    must hold the same layout (ValueError otherwise). load_state_dict adopts a saved layout.

    ``padding_mode``: as nn.Conv2d's ('zeros', 'reflect', 'replicate', 'circular'): other than
    'zeros', the input is padded first and convolved without padding.
    ``layout``: None (half the channels analytic, spread over the six analytic families, blocked
    in code order, then the plain channels), {family: count}, or a sequence of C_out families.
    Input [N, C_in, H, W] -> output [N, C_out, H_out, W_out] (unbatched [C_in, H, W] -> [C_out, H_out, W_out]).
    """

    #: (signature, bound backend call) of the last forward call (see forward); a class default, so
    #: that modules pickled before it existed load and run.
    _call_plan: Optional[tuple] = None
    #: nn.Conv2d's: how the input is padded ('zeros', 'reflect', 'replicate' or 'circular').
    padding_mode: str = "zeros"
    #: The module's own ``family`` buffer (forward checks any other tensor found in its place).
    _family_buffer: Optional[torch.Tensor] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: PaddingArg = 0, dilation: IntOrPair = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", layout: LayoutSpec = None, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        self._conv = ConvArgs.make(stride, padding, dilation, groups)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, but got padding_mode={padding_mode!r}")
        self.padding_mode = padding_mode
        in_channels, out_channels = positive_int(in_channels, "in_channels"), positive_int(out_channels, "out_channels")
        groups = self._conv.groups
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.backend = backend
        self._layout = make_layout(layout, out_channels)
        factory = {"device": device, "dtype": dtype}
        cg = in_channels // groups
        self.akp = nn.Parameter(torch.empty(self._layout.num_analytic, cg, AKP_SLOTS, **factory))
        self.weight = (nn.Parameter(torch.empty(self._layout.num_plain, cg, *self.kernel_size, **factory))
                       if self._layout.num_plain else None)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.register_buffer("family", torch.tensor(self._layout.codes, dtype=torch.int64, device=device))
        self._family_buffer = self.family
        self.reset_parameters()
        self._warm_layout()

    @property
    def layout(self) -> Layout:
        return self._layout

    def _warm_layout(self) -> None:
        """Makes the layout's index tensors for the parameters' device now, before any torch.compile
        or torch.export trace could (Layout.tensors)."""
        if self.akp.device.type != "meta" and not torch.compiler.is_compiling():
            self._layout.tensors(self.akp.device)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .to_empty(): the parameters' new device
        before = self.family
        module = super()._apply(fn, recurse)
        if self.family.dtype != torch.int64:  # .type(dtype) casts every buffer: the codes stay integers
            self.family = self.family.to(torch.int64)
        if self.family is not before:  # a tensor made by fn: to_empty (skip_init, deferred init) leaves it
            self._fill_family_buffer()  # uninitialised
        self._warm_layout()
        return module

    def _fill_family_buffer(self) -> None:
        with torch.no_grad():
            self.family.copy_(torch.tensor(self._layout.codes, dtype=torch.int64, device="cpu"))
        self._family_buffer = self.family

    # stride / padding / dilation read and write through the normalised ConvArgs the forward pass
    # uses, so assigning one (as people do with nn.Conv2d) takes effect and is validated.
    @property
    def stride(self) -> tuple[int, int]:
        return self._conv.stride

    @stride.setter
    def stride(self, value: IntOrPair) -> None:
        self._conv = ConvArgs.make(value, self._conv.padding, self._conv.dilation, self._conv.groups)

    @property
    def padding(self) -> tuple[int, int] | str:
        return self._conv.padding

    @padding.setter
    def padding(self, value: PaddingArg) -> None:
        self._conv = ConvArgs.make(self._conv.stride, value, self._conv.dilation, self._conv.groups)

    @property
    def dilation(self) -> tuple[int, int]:
        return self._conv.dilation

    @dilation.setter
    def dilation(self, value: IntOrPair) -> None:
        self._conv = ConvArgs.make(self._conv.stride, self._conv.padding, value, self._conv.groups)

    @property
    def groups(self) -> int:
        """Fixed at construction: the parameters' shapes depend on it."""
        return self._conv.groups

    # -- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """nn.Conv2d's default init for plain rows and bias; analytic rows get readable AKPs
        (orientations spread evenly over [0, pi), scales tied to the kernel size) and amplitudes
        a = z * std_conv / rms_family(K with a = 1), z ~ N(0, 1), so each family's synthesized slices
        have the second moment E[W^2] = 1 / (3 fan_in) of nn.Conv2d's kaiming_uniform(a=sqrt(5))
        init (rms_family: over all slices of the family)."""
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self._fill_family_buffer()
        with torch.no_grad():
            if self.akp.shape[0] and self.akp.device.type != "meta":  # nothing to fill on meta, as nn.init
                self.akp.copy_(init_akp(self._layout, self.akp.shape[1], self.kernel_size, fan_in,
                                        self.akp.dtype, self.akp.device))

    # -- forward ----------------------------------------------------------------------------
    def synthesize(self) -> torch.Tensor:
        """The full weight W [C_out, C_in/g, kH, kW] this layer convolves with."""
        return functional.synthesize(self.akp, self.weight, self._layout, self.kernel_size, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._buffers.get("family") is not self._family_buffer:
            self._check_family_buffer()
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: the graph records one call, as for nn.Conv2d
            c = self._conv
            return _fx_conv2d(x, self.akp, self.weight, self.bias, self._layout.codes, self.kernel_size, c.stride,
                              c.padding, c.dilation, c.groups, self.padding_mode, self.backend)
        x, conv = _padded(x, self._conv, self.kernel_size, self.padding_mode)
        # Traced (no state kept between calls: torch.jit.trace's check traces again and compares), or
        # unbatched [C_in, H, W] (as nn.Conv2d takes it).
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or (isinstance(x, torch.Tensor) and x.dim() == 3):
            return functional.conv2d(x, self.akp, self.weight, self._layout, self.bias, conv,
                                     self.kernel_size, backend=self.backend)
        akp, weight, bias = self.akp, self.weight, self.bias
        signature = self._call_signature(x, akp, weight, bias, conv)
        plan = self._call_plan
        if plan is None or plan[0] != signature:
            akp_, weight_, ks, name = functional.checked_conv2d_call(x, akp, weight, self._layout, bias, conv,
                                                                     self.kernel_size, self.backend)
            plan = (signature, functional.bound_conv2d(name, self._layout, conv, ks, akp_.device,
                                                       autocast=autocast_dtype(x) is not None))
            if akp_ is akp and weight_ is weight:
                self._call_plan = plan
            else:  # the checks stood in for a missing or empty parameter: run with theirs, keep nothing
                akp, weight = akp_, weight_
        return plan[1](x, akp, weight, bias)

    def _check_family_buffer(self) -> None:
        """A ``family`` tensor other than the module's own buffer (torch.func.functional_call's, a
        vmapped ensemble's stacked buffers, an assigned tensor) is read back each call (a device sync
        on CUDA) and must hold the layer's layout, in every ensemble member: the layer computes with
        its ``Layout``, and would otherwise run another layout's parameters as if they were its own
        without a word. Not checked while torch.compile or torch.export trace, nor on fake tensors."""
        family = self._buffers.get("family")
        if family is None or torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(family):
            return
        stacked = family
        while torch._C._functorch.is_functorch_wrapped_tensor(stacked):
            bdim = torch._C._functorch.maybe_get_bdim(stacked) if torch._C._functorch.is_batchedtensor(stacked) else -1
            stacked = torch._C._functorch.get_unwrapped(stacked)
            stacked = stacked.movedim(bdim, 0) if bdim >= 0 else stacked
        if stacked.device.type == "meta":
            return
        codes = self._layout.codes
        members = stacked.reshape(-1, stacked.shape[-1] if stacked.dim() else 1).tolist()
        if stacked.shape[-1:] != (len(codes),) or any(tuple(m) != codes for m in members):
            held = members if len(members) > 1 else members[0]
            raise ValueError(
                f"{type(self).__name__}: the tensor in place of its family buffer holds {held} but this "
                f"layer computes with its layout {list(codes)}: every member of an ensemble "
                "(torch.func.stack_module_state) needs the layout of the module that runs them; to run "
                "another layer's parameters with its own layout, call that layer, or load its state dict "
                "into this one (load_state_dict adopts any arrangement of the same numbers of analytic "
                "and plain channels). A buffer that buffer averaging wrote into (AveragedModel with "
                "use_buffers=True) holds no layout: pass its layer's state_dict(), which saves the layout")

    def __prepare_scriptable__(self) -> "AnalyticConv2d":
        # torch.jit.script calls this first: refuse with a reason rather than fail inside the compiler
        # on the first Python-only line of the module.
        raise RuntimeError("AnalyticConv2d cannot be compiled by torch.jit.script (deprecated by PyTorch): its "
                           "forward picks a backend in Python; use torch.compile, torch.export or torch.jit.trace, "
                           "or AnalyticConv2d.convert_to_conv2d(model) for a model of nn.Conv2d layers")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_family_buffer" not in state:  # pickled before the attribute existed: its buffer is its own
            self._family_buffer = self._buffers.get("family")

    def __getstate__(self) -> dict:
        # Copies and pickles start without a call plan: it holds a function bound to this module's
        # device tensors, which pickle cannot store.
        state = super().__getstate__()
        state.pop("_call_plan", None)
        return state

    def _call_signature(self, x: torch.Tensor, akp, weight, bias, conv: ConvArgs) -> Optional[tuple]:
        """Everything the checks and the backend choice of a forward call read: a call with the same
        signature as the last one reuses its outcome, the backend's call bound once (measured on
        the CPU, 8->8 3x3, 1 thread: a module call cost 19 us more than the op it makes, 9 us with
        the outcome reused, 7 us with the call bound). None for a non-tensor input."""
        if not isinstance(x, torch.Tensor):
            return None
        return (x.dtype, x.device, x.shape, autocast_dtype(x), functorch_transforms(),
                _tensor_signature(akp), _tensor_signature(weight),
                _tensor_signature(bias), self._layout, conv, self.kernel_size, self.backend)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        family = destination.get(prefix + "family")
        if family is not None:  # the layout, whatever was written into the buffer
            destination[prefix + "family"] = torch.tensor(self._layout.codes, dtype=torch.int64,
                                                          device=family.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Adopt the saved layout when this module's parameters can hold it (same numbers of analytic
        and plain channels, any arrangement); otherwise report why, keeping this module's layout."""
        key = prefix + "family"
        layout = self._layout
        if key in state_dict:
            try:
                saved = make_layout(state_dict[key], self.out_channels)
                if (saved.num_analytic, saved.num_plain) != (layout.num_analytic, layout.num_plain):
                    raise ValueError(
                        f"the saved layout ({describe_counts(saved.counts())}) has {saved.num_analytic} analytic "
                        f"and {saved.num_plain} plain channels but this module's ({describe_counts(layout.counts())}) "
                        f"has {layout.num_analytic} and {layout.num_plain}; build the module with "
                        f"layout=state_dict[{key!r}] to load it")
                layout = saved
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{key}: {e}")
                state_dict = {**state_dict, key: self.family}  # leave the buffer as it is
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._layout = layout
        self._family_buffer = self._buffers.get("family")  # load_state_dict(assign=True) puts the saved tensor there
        self._warm_layout()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", layout=[{describe_counts(self._layout.counts())}]"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    # -- reading the layer ------------------------------------------------------------------
    def natural_akps(self) -> dict[str, dict[str, torch.Tensor]]:
        """AKPs in natural units per analytic family present:
        {family name: {"channels": [n] output channels, "a", "theta" (radians), "sigma", "gamma",
        "lambda", "rho" (pixels), "psi" (radians): [n, C_in/g]}} (only the family's own AKPs)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        akp = self.akp.detach()
        for family, rows in self._layout.family_rows.items():
            p = akp[list(rows)]
            entry = {"channels": torch.tensor([self._layout.analytic_channels[r] for r in rows])}
            for i, raw_name in enumerate(AKP_NAMES[family]):
                value = p[..., i]
                name = raw_name
                if raw_name.startswith("s_"):
                    name, value = raw_name[2:], pos(value)
                entry[name] = value
            out[family.name] = entry
        return out

    def parameter_report(self) -> "ParameterReport":
        """Per-family parameter counts against an nn.Conv2d of the same shape."""
        return ParameterReport.of(self._layout, self.in_channels // self.groups, self.kernel_size,
                                  self.bias is not None)

    # -- conversion to and from nn.Conv2d ---------------------------------------------------
    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, layout: LayoutSpec = None, backend: str = "auto") -> "AnalyticConv2d":
        """An AnalyticConv2d with ``conv``'s arguments, device and dtype: its plain channels hold
        ``conv``'s kernels of those output channels and its bias a copy of ``conv``'s; the analytic
        channels start from the usual init (a layout of only plain channels computes what ``conv``
        does). channels_last where ``conv.weight`` is; ``conv``'s training mode, and frozen where it is."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"from_conv2d takes an nn.Conv2d, got {type(conv).__name__}")
        weight = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, layout=layout,
                    backend=backend, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if layer.weight is not None:
                layer.weight.copy_(weight[list(layer.layout.plain_channels)])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        # Frozen stays frozen and eval stays eval, as nn.SyncBatchNorm.convert_sync_batchnorm keeps them.
        for p in (layer.akp, layer.weight):
            if p is not None:
                p.requires_grad_(weight.requires_grad)
        if conv.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        layer.train(conv.training)
        return layer.to(memory_format=torch.channels_last) if suggests_channels_last(weight) else layer

    @classmethod
    def convert_from_conv2d(cls, module: nn.Module, layout: Union[LayoutSpec, Callable[[nn.Conv2d], LayoutSpec]] = None,
                            backend: str = "auto") -> nn.Module:
        """``module`` with every nn.Conv2d in it (``module`` itself included; not its subclasses,
        whose forward may differ) replaced by :meth:`from_conv2d`; ``layout`` is one spec for every
        layer or a function of the nn.Conv2d giving its spec. The other submodules are kept."""
        return _replace_modules(module, lambda m: type(m) is nn.Conv2d,
                                lambda c: cls.from_conv2d(c, layout(c) if callable(layout) else layout, backend))

    def to_conv2d(self) -> nn.Conv2d:
        """An nn.Conv2d computing what this layer computes now: the same arguments, ``weight`` the
        synthesized W [C_out, C_in/g, kH, kW] (channels_last where the plain weight is, as after
        ``.to(memory_format=torch.channels_last)``) and a copy of ``bias``, on this layer's device and
        dtype, detached from it (frozen where the layer's parameters are). For inference and export: it
        skips synthesis on every call, and any tool that knows nn.Conv2d takes it."""
        weight = self.weight
        channels_last = weight is not None and suggests_channels_last(weight)
        with torch.no_grad():
            W = self.synthesize()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                         device="meta", dtype=W.dtype)
        frozen = not any(p.requires_grad for p in (self.akp, weight) if p is not None)
        conv.weight = nn.Parameter(W.clone(memory_format=torch.channels_last if channels_last else
                                           torch.contiguous_format), requires_grad=not frozen)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return conv.train(self.training)

    @classmethod
    def convert_to_conv2d(cls, module: nn.Module) -> nn.Module:
        """``module`` with every AnalyticConv2d in it (``module`` itself included) replaced by its
        :meth:`to_conv2d`, as nn.SyncBatchNorm.convert_sync_batchnorm converts batch norms: the
        other submodules are kept, not copied; returns the converted module."""
        return _replace_modules(module, lambda m: isinstance(m, cls), lambda m: m.to_conv2d())


def _replace_modules(module: nn.Module, match: Callable[[nn.Module], bool],
                     convert: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``module`` with every submodule that ``match``es (``module`` itself included) replaced by
    ``convert(submodule)``, the others kept; in place, as nn.SyncBatchNorm.convert_sync_batchnorm."""
    if match(module):
        return convert(module)
    for name, child in module.named_children():
        converted = _replace_modules(child, match, convert)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _padded(x: torch.Tensor, conv: ConvArgs, kernel_size: tuple[int, int], padding_mode: str
            ) -> tuple[torch.Tensor, ConvArgs]:
    """(x, conv) for padding_mode 'zeros'; otherwise, as nn.Conv2d, x padded here and the
    convolution's own padding dropped."""
    if padding_mode == "zeros":
        return x, conv
    top, bottom, left, right = conv.explicit_padding(kernel_size)
    x = F.pad(x, (left, right, top, bottom), mode=padding_mode)
    return x, ConvArgs(conv.stride, (0, 0), conv.dilation, conv.groups)  # normalised already


def _fx_conv2d(x: torch.Tensor, akp: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               codes: tuple[int, ...], kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int] | str, dilation: tuple[int, int], groups: int, padding_mode: str,
               backend: str) -> torch.Tensor:
    """AnalyticConv2d's forward from plain values (what an FX graph can hold): the call
    torch.fx.symbolic_trace records for the layer (a leaf of the graph, wrapped below)."""
    x, conv = _padded(x, ConvArgs(stride, padding, dilation, groups), kernel_size, padding_mode)
    return functional.conv2d(x, akp, weight, _layout_of(codes), bias, conv, kernel_size, backend=backend)


torch.fx.wrap("_fx_conv2d")


@functools.lru_cache(maxsize=64)
def _layout_of(codes: tuple[int, ...]) -> Layout:
    """One Layout per mosaic for traced calls, so that its index tensors are made once."""
    return Layout(codes)


def _tensor_signature(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (t.dtype, t.device, t.shape)


@dataclass(frozen=True)
class ParameterReport:
    """Rows: (family name, channels, ACL parameters, nn.Conv2d parameters) per family present."""

    rows: tuple[tuple[str, int, int, int], ...]
    bias: int

    @staticmethod
    def of(layout: Layout, cg: int, kernel_size: tuple[int, int], bias: bool) -> "ParameterReport":
        k = kernel_size[0] * kernel_size[1]
        rows = []
        for family, n in layout.counts().items():
            per_slice = k if family == Family.PLAIN else AKP_COUNT[family]
            rows.append((family.name, n, n * cg * per_slice, n * cg * k))
        return ParameterReport(tuple(rows), layout.out_channels if bias else 0)

    @property
    def acl_total(self) -> int:
        return sum(r[2] for r in self.rows) + self.bias

    @property
    def conv_total(self) -> int:
        return sum(r[3] for r in self.rows) + self.bias

    @property
    def saving(self) -> float:
        """Fraction of nn.Conv2d's parameters the ACL layer does not need."""
        return 1 - self.acl_total / self.conv_total

    def __str__(self) -> str:
        lines = [f"{'family':<8}{'channels':>9}{'ACL params':>12}{'Conv2d params':>15}"]
        for name, n, acl, conv in self.rows:
            lines.append(f"{name:<8}{n:>9}{acl:>12}{conv:>15}")
        if self.bias:
            lines.append(f"{'bias':<8}{'':>9}{self.bias:>12}{self.bias:>15}")
        lines.append(f"{'total':<8}{'':>9}{self.acl_total:>12}{self.conv_total:>15}"
                     f"   saving {100 * self.saving:.1f}%")
        return "\n".join(lines)


# Natural-unit starting points, in pixels, as fractions of the kernel extent k = max(kH, kW).
_SIGMA_FRAC = {Family.GABOR: 1 / 4, Family.LOG: 1 / 6, Family.TGD1: 1 / 6, Family.TGD2: 1 / 6}
_RHO_FRAC = 1 / 3
_GABOR_GAMMA = 1.0


def init_akp(layout: Layout, cg: int, kernel_size: tuple[int, int], fan_in: int,
             dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """Initial raw AKPs [A, cg, 6] (see AnalyticConv2d.reset_parameters). Uses torch's RNG."""
    dtype = dtype or torch.get_default_dtype()
    with torch.device("cpu"):  # host arithmetic, even inside a `with torch.device("meta")` block
        k = max(kernel_size)
        akp = torch.zeros(layout.num_analytic, cg, AKP_SLOTS, dtype=torch.float64)
        for family, rows in layout.family_rows.items():
            n = len(rows) * cg
            spread = (torch.arange(n, dtype=torch.float64) + torch.rand(()).double()) / n  # [0, 1) evenly
            jitter = torch.empty(n, dtype=torch.float64).uniform_(0.8, 1.25)
            p = torch.zeros(n, AKP_SLOTS, dtype=torch.float64)
            if family in (Family.GABOR, Family.TGD1, Family.TGD2):
                p[:, 1] = math.pi * spread[torch.randperm(n)]
            if family == Family.GABOR:
                p[:, 2] = pos_inverse(_SIGMA_FRAC[family] * k * jitter)
                p[:, 3] = pos_inverse(torch.full((n,), _GABOR_GAMMA, dtype=torch.float64))
                p[:, 4] = pos_inverse((max(2.0, k / 2) * jitter).clamp(min=2.0))   # wavelength >= 2 px (Nyquist)
                p[:, 5] = torch.empty(n, dtype=torch.float64).uniform_(-math.pi, math.pi)
            elif family in (Family.LOG, Family.TGD1, Family.TGD2):
                p[:, 1 if family == Family.LOG else 2] = pos_inverse(_SIGMA_FRAC[family] * k * jitter)
            elif family == Family.LOT:
                p[:, 1] = pos_inverse(_RHO_FRAC * k * jitter)
            akp[list(rows)] = p.view(len(rows), cg, AKP_SLOTS)
        # Amplitudes: match nn.Conv2d's default init variance 1 / (3 fan_in) over each family's slices.
        # Normalising per family, not per slice, keeps a slice that happens to be nearly zero on the
        # grid (a TGD1 lobe pair across a 1-pixel-wide kernel) from getting a huge amplitude that a
        # later change of theta or sigma would turn into a huge kernel.
        akp[..., 0] = 1.0
        unit = synthesize_layout(akp, None, Layout([c for c in layout.codes if c]), kernel_size)
        mean_square = unit.pow(2).mean(dim=(2, 3))
        z = torch.randn(akp.shape[:2], dtype=torch.float64)
        for rows in layout.family_rows.values():
            rms = mean_square[list(rows)].mean().sqrt().item()
            akp[list(rows), :, 0] = z[list(rows)] / math.sqrt(3 * fan_in) / (rms if rms > 0 else 1.0)
    return akp.to(dtype=dtype, device=device)
