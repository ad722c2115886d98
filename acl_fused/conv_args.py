"""Convolution arguments with nn.Conv2d meaning (SPEC §5), normalised once for every backend."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Union

IntOrPair = Union[int, tuple[int, int], list[int]]
PaddingArg = Union[IntOrPair, str]


def as_int(value) -> int | None:
    """A Python int from anything integer that nn.Conv2d takes (int, numpy's integers: whatever has
    ``__index__``), bool excepted; None for anything else."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value: int, name: str) -> int:
    """``value`` as a Python int > 0; ValueError naming ``name`` otherwise."""
    n = as_int(value)
    if n is None or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return n


def pair(value: IntOrPair, name: str, minimum: int) -> tuple[int, int]:
    """(h, w) from an int or a pair of ints, each >= minimum; ValueError naming ``name`` otherwise."""
    if as_int(value) is not None:
        value = (value, value)
    ints = [as_int(v) for v in value] if isinstance(value, (tuple, list)) else []
    if len(ints) != 2 or None in ints:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(ints) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(ints)}")
    return ints[0], ints[1]


@dataclass(frozen=True)
class ConvArgs:
    """stride, padding, dilation, groups as nn.Conv2d takes them.

    ``padding`` is a pair of ints or one of the strings 'same' / 'valid' (kept as given so the
    library convolution sees exactly what the user wrote); :meth:`explicit_padding` resolves it.
    """

    stride: tuple[int, int] = (1, 1)
    padding: Union[tuple[int, int], str] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @staticmethod
    def make(stride: IntOrPair = 1, padding: PaddingArg = 0, dilation: IntOrPair = 1,
             groups: int = 1) -> "ConvArgs":
        stride_ = pair(stride, "stride", 1)
        dilation_ = pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"Invalid padding string {padding!r}, should be one of ('valid', 'same')")
            if padding == "same" and stride_ != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            padding_: Union[tuple[int, int], str] = padding
        else:
            padding_ = pair(padding, "padding", 0)
        return ConvArgs(stride_, padding_, dilation_, positive_int(groups, "groups"))

    def explicit_padding(self, kernel_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding; 'same' puts the odd pixel at the bottom/right,
        exactly as torch.nn.functional.conv2d does."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            out = []
            for k, d in zip(kernel_size, self.dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return (out[0], out[1], out[2], out[3])
        ph, pw = self.padding
        return (ph, ph, pw, pw)

    def output_size(self, input_hw: tuple[int, int], kernel_size: tuple[int, int]) -> tuple[int, int]:
        top, bottom, left, right = self.explicit_padding(kernel_size)
        sizes = []
        for n, k, s, d, p in zip(input_hw, kernel_size, self.stride, self.dilation, (top + bottom, left + right)):
            sizes.append((n + p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]
