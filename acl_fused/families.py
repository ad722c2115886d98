"""Family codes, AKP packing and the positive map of SPEC §3-§4 (shared by every backend)."""
from __future__ import annotations

import enum
from typing import Union

import torch

from .conv_args import as_int

#: Width of the packed AKP tensor's last axis (SPEC §5): every family's AKPs fit in 6 slots.
AKP_SLOTS = 6
#: pos(s) = exp(s) + POS_EPS (SPEC §3).
POS_EPS = 1e-3


class Family(enum.IntEnum):
    """Kernel families with the fixed codes of SPEC §4 (they appear in saved state and kernels)."""

    PLAIN = 0
    GABOR = 1
    LOG = 2
    LOT = 3
    TGD1 = 4
    TGD2 = 5
    MEAN = 6


ANALYTIC_FAMILIES = tuple(f for f in Family if f != Family.PLAIN)

#: Raw AKP names per analytic family, in packing order (SPEC §4 table).
AKP_NAMES: dict[Family, tuple[str, ...]] = {
    Family.GABOR: ("a", "theta", "s_sigma", "s_gamma", "s_lambda", "psi"),
    Family.LOG: ("a", "s_sigma"),
    Family.LOT: ("a", "s_rho"),
    Family.TGD1: ("a", "theta", "s_sigma"),
    Family.TGD2: ("a", "theta", "s_sigma"),
    Family.MEAN: ("a",),
}
AKP_COUNT: dict[Family, int] = {f: len(n) for f, n in AKP_NAMES.items()}

FamilyLike = Union[Family, int, str]


def as_family(value: FamilyLike) -> Family:
    """Family from a code (int), a name (case-insensitive) or a Family; ValueError otherwise."""
    if isinstance(value, Family):
        return value
    if isinstance(value, str):
        try:
            return Family[value.strip().upper()]
        except KeyError:
            names = ", ".join(f.name for f in Family)
            raise ValueError(f"unknown ACL family name {value!r}; expected one of {names}") from None
    code = as_int(value)
    if code is None:
        raise TypeError(f"ACL family must be a Family, an int code or a name, got {type(value).__name__}")
    try:
        return Family(code)
    except ValueError:
        raise ValueError(f"unknown ACL family code {value}; valid codes are 0..{len(Family) - 1}") from None


def pos(s: torch.Tensor) -> torch.Tensor:
    """SPEC §3: positive quantity read from its raw value."""
    return torch.exp(s) + POS_EPS


def pos_inverse(q: torch.Tensor | float) -> torch.Tensor:
    """Raw value whose pos() is q (q > POS_EPS); used by initialisation."""
    q = torch.as_tensor(q)
    return torch.log(q - POS_EPS)
