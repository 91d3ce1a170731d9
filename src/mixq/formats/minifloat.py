"""Minifloat formats: sign, E exponent bits, M mantissa bits, a bias, subnormals.

OCP FP8 E4M3 reserves only S.1111.111 for NaN (max 448); E5M2 reserves the all-ones
exponent for inf/NaN (max 57344); FP6 E3M2 / E2M3 and FP4 E2M1 reserve nothing.  The
denormalised variant (``-dn``) has no implicit leading bit: ``2^(E-bias) * M/2^m``.
OCP MX formats (``mxfp4``, ``mxfp6-e3m2``, ...) are these elements with an E8M0 scale
per block of 32; block minifloat (``bmf8-e4m3-g16``) shares the exponent bias per block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mixq.errors import FormatError
from mixq.formats.base import Format, check_group, granularity_suffix
from mixq.formats.codebook import CodebookFormat
from mixq.formats.registry import GRANULARITIES, exclusive, group_tokens, register_family, spelled

DEFAULT_LAYOUT = {4: (2, 1), 6: (3, 2), 8: (4, 3)}
MX_LAYOUTS = {(2, 1), (3, 2), (2, 3), (4, 3), (5, 2)}
MX_BLOCK = 32


@functools.cache
def minifloat_values(exp_bits: int, man_bits: int, bias: int, denorm: bool) -> tuple[float, ...]:
    top = 2**exp_bits - 1
    reserved = {(4, 3): "nan", (5, 2): "ieee"}.get((exp_bits, man_bits), "none")
    vals: set[float] = set()
    for e in range(top + 1):
        for m in range(2**man_bits):
            if reserved == "nan" and e == top and m == 2**man_bits - 1:
                continue
            if reserved == "ieee" and e == top:
                continue
            frac = m / 2**man_bits
            if denorm:
                v = 2.0 ** (e - bias) * frac
            elif e == 0:
                v = 2.0 ** (1 - bias) * frac  # subnormal
            else:
                v = 2.0 ** (e - bias) * (1 + frac)
            vals.update((v, -v))
    return tuple(sorted(vals))


@dataclass(frozen=True)
class MinifloatFormat(CodebookFormat):
    exp_bits: int
    man_bits: int
    bias: int | None = None  # None: the IEEE-style default 2^(E-1) - 1
    denorm: bool = False
    scaling: str = "absmax"
    group_size: int | None = None
    per_tensor: bool = False

    def __post_init__(self) -> None:
        bits = 1 + self.exp_bits + self.man_bits
        if self.exp_bits < 1 or self.man_bits < 0 or not 3 <= bits <= 8:
            raise FormatError(f"fp{bits}-e{self.exp_bits}m{self.man_bits}: minifloats take 3 to 8 bits with E >= 1")
        check_group(f"fp{bits}", self.group_size, self.per_tensor)
        self._check_scaling()

    @property
    def effective_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 if self.bias is None else self.bias

    @property
    def code_bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        layout = f"e{self.exp_bits}m{self.man_bits}"
        extra = ("" if self.bias is None else f"-bias{self.bias}") + ("-dn" if self.denorm else "")
        if self.scaling == "pow2":
            mx = (self.exp_bits, self.man_bits) in MX_LAYOUTS and not extra and self.group_size == MX_BLOCK
            if mx:
                return "mxfp4" if layout == "e2m1" else f"mxfp{self.code_bits}-{layout}"
            return f"bmf{self.code_bits}-{layout}{extra}-g{self.group_size}"
        tail = "-raw" if self.scaling == "none" else granularity_suffix(self.group_size, self.per_tensor)
        return f"fp{self.code_bits}-{layout}{extra}{tail}"

    def values(self) -> tuple[float, ...]:
        return minifloat_values(self.exp_bits, self.man_bits, self.effective_bias, self.denorm)


_LAYOUT, _BIAS = r"e\d+m\d+", r"bias\d+"
_TOKENS = {_LAYOUT, _BIAS, "dn"}


def _layout(bits: int, name: str, others: list[str]) -> tuple[int, int, int | None, bool]:
    """Exponent and mantissa bits, bias and denormalisation of ``name`` (as written) from
    its option tokens ``others`` (granularity removed)."""
    layout, bias = exclusive(name, others, "layout", (_LAYOUT,)), exclusive(name, others, "bias", (_BIAS,))
    if layout is None:
        if bits not in DEFAULT_LAYOUT:
            raise FormatError(f"{name}: give the layout, e.g. fp{bits}-e{bits - 3}m2")
        e, m = DEFAULT_LAYOUT[bits]
    else:
        e, m = int(layout[1 : layout.index("m")]), int(layout[layout.index("m") + 1 :])
    if 1 + e + m != bits:
        raise FormatError(f"{name}: 1 + {e} + {m} bits is not {bits}")
    return e, m, None if bias is None else int(bias[4:]), "dn" in others


@register_family("fp", "minifloat: fpB-eEmM[-biasN][-dn][-raw|-gG|-tensor|-mx] (default fp16 absmax scale per channel)")
def _parse_fp(bits: int, tokens: list[str]) -> Format:
    name = f"fp{bits}"
    grain = () if "raw" in tokens else ("gN",) if "mx" in tokens else GRANULARITIES  # raw: no scale; mx: blocks
    group, per_tensor, others = group_tokens(name, tokens, _TOKENS | {"raw", "mx"}, granularity=grain)
    e, m, bias, denorm = _layout(bits, spelled(name, tokens), others)
    scaling = {None: "absmax", "raw": "none", "mx": "pow2"}[exclusive(spelled(name, tokens), others, "scaling", ("raw", "mx"))]
    if scaling == "pow2" and group is None:
        group = MX_BLOCK
    return MinifloatFormat(e, m, bias, denorm, scaling, group, per_tensor)


@register_family("mxfp", "OCP MX minifloat: mxfp4, mxfp6-e3m2, mxfp6-e2m3, mxfp8-e4m3, mxfp8-e5m2 (E8M0 scale, block 32)")
def _parse_mxfp(bits: int, tokens: list[str]) -> Format:
    name = f"mxfp{bits}"
    group, _, others = group_tokens(name, tokens, {_LAYOUT}, granularity=("gN",))
    e, m, _, _ = _layout(bits, spelled(name, tokens), others)
    if (e, m) not in MX_LAYOUTS or group not in (None, MX_BLOCK):
        raise FormatError(f"{spelled(name, tokens)}: OCP MX defines mxfp4, mxfp6-e3m2, mxfp6-e2m3, mxfp8-e4m3 and "
                          f"mxfp8-e5m2, in blocks of {MX_BLOCK}; other layouts and blocks are bmf{bits}-e{e}m{m}-gG")
    return MinifloatFormat(e, m, None, False, "pow2", MX_BLOCK)


@register_family("bmf", "block minifloat: bmfB-eEmM-gG (exponent bias shared per block)")
def _parse_bmf(bits: int, tokens: list[str]) -> Format:
    name = f"bmf{bits}"
    group, _, others = group_tokens(name, tokens, _TOKENS, granularity=("gN",))
    e, m, bias, denorm = _layout(bits, spelled(name, tokens), others)
    return MinifloatFormat(e, m, bias, denorm, "pow2", 16 if group is None else group)
