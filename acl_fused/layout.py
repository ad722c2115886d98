"""The mosaic: which family each output channel uses, and where its parameters live (SPEC §5).

A :class:`Layout` is validated once on the host and then caches its index tensors per device, so
a layer's forward pass never synchronises with the device to read its own layout.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch

from .conv_args import as_int, positive_int
from .families import ANALYTIC_FAMILIES, Family, FamilyLike, as_family


class Layout:
    """Host-side description of a mosaic of ``C_out`` output channels.

    Attributes:
        codes: tuple of ``C_out`` family codes (ints).
        plain_channels / analytic_channels: output channels of the plain rows of ``weight`` and
            of the analytic rows of ``akp``, in row order (plain row r is output channel
            ``plain_channels[r]``).
        row: for each output channel, its row in ``weight`` (plain) or ``akp`` (analytic).
        family_rows: {Family: analytic row indices of that family}, families present only.
    """

    __slots__ = ("codes", "plain_channels", "analytic_channels", "row", "family_rows", "_device_cache")

    def __init__(self, codes: Sequence[int]):
        self.codes = tuple(int(as_family(c)) for c in codes)
        self.plain_channels = tuple(o for o, f in enumerate(self.codes) if f == Family.PLAIN)
        self.analytic_channels = tuple(o for o, f in enumerate(self.codes) if f != Family.PLAIN)
        row = [0] * len(self.codes)
        for r, o in enumerate(self.plain_channels):
            row[o] = r
        for r, o in enumerate(self.analytic_channels):
            row[o] = r
        self.row = tuple(row)
        self.family_rows = {
            f: tuple(r for r, o in enumerate(self.analytic_channels) if self.codes[o] == f)
            for f in ANALYTIC_FAMILIES
        }
        self.family_rows = {f: rows for f, rows in self.family_rows.items() if rows}
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def out_channels(self) -> int:
        return len(self.codes)

    @property
    def num_plain(self) -> int:
        return len(self.plain_channels)

    @property
    def num_analytic(self) -> int:
        return len(self.analytic_channels)

    def counts(self) -> dict[Family, int]:
        """Number of output channels per family (families present only), in code order."""
        return {f: self.codes.count(int(f)) for f in Family if int(f) in self.codes}

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Index tensors on ``device`` (cached):

        ``family`` [C_out] int64 codes; ``family_i32`` / ``row_i32`` [C_out] int32 (for kernels);
        ``plain_channels`` [P], ``analytic_channels`` [A] int64;
        ``rows_<code>`` int64 analytic rows of each present family;
        ``gather_order`` [C_out] int64: position of output channel o in the concatenation
        ``[plain rows, family 1 rows, ..., family 6 rows]`` (used by the reference path).

        Only eager tensors are cached: made while torch.compile or torch.export traces, they are
        the trace's own (torch.export's are fake, which later eager calls would then read). A
        module fills its device's entry before any trace (AnalyticConv2d._warm_layout): Inductor
        crashed (glibc heap corruption, torch 2.13 CPU) on these tensors made inside the graph.
        """
        device = torch.device(device)
        cached = self._device_cache.get(device)
        if cached is None and not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # Made under inference_mode they would be inference tensors, which a later training call
            # could not save for backward: the cache outlives the mode (a checkpoint loaded under it).
            with torch.inference_mode(False):
                return self.tensors(device)
        if cached is None:
            order = list(self.plain_channels)
            for rows in self.family_rows.values():
                order.extend(self.analytic_channels[r] for r in rows)
            gather = [0] * len(order)
            for pos_, o in enumerate(order):
                gather[o] = pos_

            def t(v, dtype=torch.int64):
                return torch.tensor(v, dtype=dtype, device=device)

            cached = {
                "family": t(self.codes),
                "family_i32": t(self.codes, torch.int32),
                "row_i32": t(self.row, torch.int32),
                "plain_channels": t(self.plain_channels),
                "analytic_channels": t(self.analytic_channels),
                "gather_order": t(gather),
            }
            for f, rows in self.family_rows.items():
                cached[f"rows_{int(f)}"] = t(rows)
            if not torch.compiler.is_compiling() and all(type(v) is torch.Tensor for v in cached.values()):
                self._device_cache[device] = cached
        if torch.compiler.is_compiling():
            # Their sizes are the layout's: under torch.compile(dynamic=True) they would become symbols,
            # and C_out with them (Inductor then failed to lower a channels_last backward).
            for v in cached.values():
                torch._dynamo.mark_static(v)
        return cached

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.codes == self.codes

    def __hash__(self) -> int:
        return hash(self.codes)

    def __repr__(self) -> str:
        return f"Layout({describe_counts(self.counts())})"


def describe_counts(counts: Mapping[Family, int]) -> str:
    return ", ".join(f"{f.name}={n}" for f, n in counts.items())


LayoutSpec = Union[None, Mapping[FamilyLike, int], Sequence[FamilyLike], torch.Tensor, Layout]


def default_codes(out_channels: int) -> list[int]:
    """Half the channels analytic (rounded down), spread evenly over the six analytic families
    (lower codes get the remainder), the rest plain; blocked in family-code order (PLAIN first),
    the same order a {family: count} layout gives."""
    n_analytic = out_channels // 2
    base, extra = divmod(n_analytic, len(ANALYTIC_FAMILIES))
    codes = [int(Family.PLAIN)] * (out_channels - n_analytic)
    for i, f in enumerate(ANALYTIC_FAMILIES):
        codes += [int(f)] * (base + (1 if i < extra else 0))
    return codes


def make_layout(spec: LayoutSpec, out_channels: int) -> Layout:
    """Layout from a user spec: None (default mosaic), {family: count} (blocked in code order, the
    counts must add up to ``out_channels``), or an explicit sequence/tensor of ``out_channels``
    family names or codes (any order)."""
    out_channels = positive_int(out_channels, "out_channels")
    if spec is None:
        return Layout(default_codes(out_channels))
    if isinstance(spec, Mapping):
        counts: dict[Family, int] = {}
        for key, n in spec.items():
            f = as_family(key)
            if f in counts:
                raise ValueError(f"layout names family {f.name} twice")
            count = as_int(n)
            if count is None or count < 0:
                raise ValueError(f"layout count for {f.name} must be a non-negative int, got {n!r}")
            counts[f] = count
        total = sum(counts.values())
        if total != out_channels:
            raise ValueError(
                f"layout counts add up to {total} channels ({describe_counts(counts)}) "
                f"but out_channels is {out_channels}")
        codes = [int(f) for f in sorted(counts) for _ in range(counts[f])]
    else:
        codes = list(spec.codes) if isinstance(spec, Layout) else layout_codes(spec)
        if len(codes) != out_channels:
            raise ValueError(f"layout lists {len(codes)} channels but out_channels is {out_channels}")
    return Layout(codes)


def layout_codes(family: Union[Sequence[FamilyLike], torch.Tensor]) -> list[int]:
    """Validated list of codes from a sequence of names/codes or a 1-D integer tensor."""
    if isinstance(family, torch.Tensor):
        if family.dim() != 1:
            raise ValueError(f"family must be a 1-D tensor of family codes, got shape {tuple(family.shape)}")
        if family.is_floating_point() or family.is_complex() or family.dtype == torch.bool:
            raise TypeError(f"family must be an integer tensor of family codes, got {family.dtype}")
        family = family.tolist()
    elif isinstance(family, (str, bytes)) or not isinstance(family, Sequence):
        raise TypeError(f"layout must be None, a dict, a sequence of families or a tensor, got {type(family).__name__}")
    return [int(as_family(f)) for f in family]


def as_layout(family: Union[Layout, Sequence[FamilyLike], torch.Tensor]) -> Layout:
    """Layout from a Layout (returned as is) or a family vector (validated; reads a device tensor
    back to the host once)."""
    if isinstance(family, Layout):
        layout = family
    elif isinstance(family, (str, bytes)) or not isinstance(family, (Sequence, torch.Tensor)):
        raise TypeError("family must be a Layout, a sequence of family names/codes or a 1-D integer tensor, "
                        f"got {type(family).__name__}")
    else:
        layout = Layout(layout_codes(family))
    if layout.out_channels == 0:
        raise ValueError("family must name at least one output channel")
    return layout
