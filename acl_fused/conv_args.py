"""Convolution arguments with nn.Conv2d meaning (SPEC §5), normalised once for every backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

IntOrPair = Union[int, tuple[int, int], list[int]]
PaddingArg = Union[IntOrPair, str]


def pair(value: IntOrPair, name: str, minimum: int) -> tuple[int, int]:
    """(h, w) from an int or a pair of ints, each >= minimum; ValueError naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


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
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        return ConvArgs(stride_, padding_, dilation_, groups)

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
