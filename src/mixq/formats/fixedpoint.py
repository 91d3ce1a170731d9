"""Fixed point: ``fxpW-fF`` is a W-bit two's-complement integer read as ``code * 2^-F``.

The scale is the fixed power of two ``2^-F`` (the second seed's integer quantisation: a
total width and a fraction width), so nothing is stored beside the codes: the whole
tensor shares the grid, W bits per weight exactly.  Codes lie in ``[-2^(W-1), 2^(W-1) - 1]``,
so the range is ``[-2^(W-1-F), 2^(W-1-F) - 2^-F]``; values round half to even and saturate
at the range.

Widths 2 to 16, fraction widths 0 to W.  ``F = W`` leaves no integer bit, not even the
sign's (range ``[-1/2, 1/2)``); a negative fraction width (steps coarser than 1, which
weights do not need) and one above the width are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.errors import FormatError
from mixq.formats.base import Format, Params
from mixq.formats.registry import register_family, spelled

MAX_WIDTH = 16


@dataclass(frozen=True)
class FixedPointFormat(Format):
    bits: int  # total width W, sign included
    frac_bits: int  # fraction width F: the value of code q is q * 2^-F

    group_size = None  # one grid for the whole tensor, nothing stored per group
    per_tensor = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= MAX_WIDTH:
            raise FormatError(f"fxp{self.bits}: fixed point takes widths of 2 to {MAX_WIDTH} bits")
        if self.frac_bits > self.bits:
            raise FormatError(f"{self.name}: the fraction width {self.frac_bits} exceeds the width {self.bits}")
        if self.frac_bits < 0:
            raise FormatError(f"{self.name}: the fraction width must not be negative")

    @property
    def name(self) -> str:
        return f"fxp{self.bits}-f{self.frac_bits}"

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def group_overhead_bits(self) -> int:
        return 0

    @property
    def lo(self) -> int:
        """Smallest code."""
        return -(2 ** (self.bits - 1))

    @property
    def hi(self) -> int:
        """Largest code."""
        return 2 ** (self.bits - 1) - 1

    def fit(self, x: Tensor) -> Params:
        return {}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        q = torch.round(x.float() * 2.0**self.frac_bits).clamp_(self.lo, self.hi)  # x * 2^F is exact
        return q.to(torch.int8 if self.bits <= 8 else torch.int16)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return codes.float() * 2.0**-self.frac_bits


@register_family("fxp", "fixed point: fxpW-fF (W-bit two's complement, F fraction bits, no scale stored)")
def _parse_fxp(bits: int, tokens: list[str]) -> Format:
    if len(tokens) != 1 or not re.fullmatch(r"f\d+", tokens[0]):
        raise FormatError(f"format {spelled(f'fxp{bits}', tokens)!r}: give the fraction width and nothing else, "
                          "e.g. fxp8-f5")
    return FixedPointFormat(bits, int(tokens[0][1:]))
