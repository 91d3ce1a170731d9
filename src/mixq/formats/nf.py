"""NormalFloat (QLoRA): code books at quantiles of a standard normal, absmax-scaled.

NF4 is built exactly as bitsandbytes' ``create_normal_map(offset=0.9677083)``: 2^(k-1)
positive quantiles, 2^(k-1) - 1 negative ones and an exact zero, normalised to [-1, 1].
NF3 and NF2 use the same construction with fewer levels and their own offset, derived by
the rule that gives NF4's: ``1 - 1/(2n)`` is the centre of the outermost of ``n`` bins of
equal probability, and the asymmetric type takes the mean over ``n = 2^k - 1`` and
``n = 2^k``: ``(1 - 1/(2(2^k - 1)) + 1 - 1/(2 * 2^k)) / 2`` (k = 4: 0.96770833, k = 3:
0.93303571, k = 2: 0.85416667).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mixq.errors import FormatError
from mixq.formats.base import Format, check_group, granularity_suffix
from mixq.formats.codebook import CodebookFormat
from mixq.formats.registry import group_tokens, register_family

NF4_OFFSET = 0.9677083  # bitsandbytes' literal, nf_offset(4) rounded to 7 digits: NF4 keeps its table


def nf_offset(bits: int) -> float:
    """The quantile of the outermost NF level: (1 - 1/(2(2^k - 1)) + 1 - 1/(2 * 2^k)) / 2."""
    n = 2**bits
    return (1 - 1 / (2 * (n - 1)) + 1 - 1 / (2 * n)) / 2


@functools.cache
def nf_values(bits: int) -> tuple[float, ...]:
    offset = NF4_OFFSET if bits == 4 else nf_offset(bits)
    npos, nneg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, npos + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, nneg + 1, dtype=torch.float64)[:-1])
    vals = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    vals = vals / vals.abs().max()
    return tuple(sorted(float(v) for v in vals))


@dataclass(frozen=True)
class NFFormat(CodebookFormat):
    bits: int
    group_size: int | None = None
    per_tensor: bool = False
    scaling: str = "absmax"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 4:
            raise FormatError(f"nf{self.bits}: NormalFloat takes 2 to 4 bits")
        check_group(f"nf{self.bits}", self.group_size, self.per_tensor)
        if self.scaling != "absmax":
            raise FormatError(f"nf{self.bits}: NormalFloat uses an absmax scale")

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def name(self) -> str:
        return f"nf{self.bits}{granularity_suffix(self.group_size, self.per_tensor)}"

    def values(self) -> tuple[float, ...]:
        return nf_values(self.bits)


@register_family("nf", "NormalFloat: nf4|nf3|nf2[-gG|-tensor] (absmax scale, fp16)")
def _parse_nf(bits: int, tokens: list[str]) -> Format:
    group, per_tensor, _ = group_tokens(f"nf{bits}", tokens, set())
    return NFFormat(bits, group, per_tensor)
