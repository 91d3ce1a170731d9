"""Logarithmic formats: a sign and a power of two, with one code kept for zero.

``logB`` has ``2^(B-1) - 1`` magnitudes ``2^0, 2^-1, ..., 2^-(2^(B-1)-2)`` (times the
group scale) plus zero, each with a sign.  ``blogB-gG`` shares a power-of-two scale
per block (block log), chosen so that the block's largest magnitude lands on its nearest
power of two: with OCP MX's rule (``floor(log2(max))``, the top element 2^0) every
maximum in (1.5, 2) times the scale would saturate to 1 instead of rounding to 2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.errors import FormatError
from mixq.formats.base import Format, check_group, floor_log2, granularity_suffix
from mixq.formats.codebook import CodebookFormat
from mixq.formats.registry import GRANULARITIES, group_tokens, register_family


@functools.cache
def log_values(bits: int) -> tuple[float, ...]:
    mags = [2.0**-k for k in range(2 ** (bits - 1) - 1)]
    return tuple(sorted({0.0, *mags, *(-m for m in mags)}))


@dataclass(frozen=True)
class LogFormat(CodebookFormat):
    bits: int
    scaling: str = "absmax"
    group_size: int | None = None
    per_tensor: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"log{self.bits}: logarithmic formats take 2 to 8 bits")
        check_group(f"log{self.bits}", self.group_size, self.per_tensor)
        self._check_scaling()

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def name(self) -> str:
        if self.scaling == "pow2":
            return f"blog{self.bits}-g{self.group_size}"
        tail = "-raw" if self.scaling == "none" else granularity_suffix(self.group_size, self.per_tensor)
        return f"log{self.bits}{tail}"

    def values(self) -> tuple[float, ...]:
        return log_values(self.bits)

    def shared_exponent(self, amax: Tensor) -> Tensor:
        """``floor(log2(amax))``, one more where ``amax / 2^floor`` exceeds 1.5 (the midpoint
        between the top magnitude 1 and the 2 above it); 1.5 itself is a tie that keeps the
        smaller exponent, so the block keeps its smallest magnitude."""
        exp = floor_log2(amax)
        return exp + (amax * torch.exp2(-exp) > 1.5).to(exp.dtype) - self.emax


@register_family("log", "logarithmic: logB[-gG|-tensor|-raw] (sign + power of two, zero kept)")
def _parse_log(bits: int, tokens: list[str]) -> Format:
    grain = () if "raw" in tokens else GRANULARITIES  # a raw grid has no scale, hence no groups
    group, per_tensor, others = group_tokens(f"log{bits}", tokens, {"raw"}, granularity=grain)
    return LogFormat(bits, "none" if others else "absmax", group, per_tensor)


@register_family("blog", "block log: blogB-gG (power-of-two scale shared per block)")
def _parse_blog(bits: int, tokens: list[str]) -> Format:
    group, _, _ = group_tokens(f"blog{bits}", tokens, set(), granularity=("gN",))
    return LogFormat(bits, "pow2", 16 if group is None else group)
