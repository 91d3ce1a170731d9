"""Integer formats: symmetric absmax, asymmetric with an integer zero point, asymmetric
with a floating-point minimum (as GGUF's Q4_1 and k-quants store it), and block
floating point (a shared power-of-two exponent per block; ``mxint8`` is OCP MXINT8).

Codes are signed: ``[-2^(b-1)+1, 2^(b-1)-1]`` for absmax and block formats,
``[-2^(b-1), 2^(b-1)-1]`` for the two asymmetric schemes (the unsigned grid shifted by
``2^(b-1)``, so a zero point of 128 is stored as 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.errors import FormatError
from mixq.formats.base import Format, Params, check_group, floor_log2, fp16_round, granularity_suffix
from mixq.formats.registry import exclusive, group_tokens, register_family, spelled

SCHEMES = ("sym", "asym", "fmin", "pow2")
E8M0_MIN, E8M0_MAX = -127, 127  # OCP MX shared-scale exponent range (255 is NaN)


@dataclass(frozen=True)
class IntFormat(Format):
    bits: int
    scheme: str = "asym"
    group_size: int | None = None
    per_tensor: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"int{self.bits}: integer formats take 2 to 8 bits")
        if self.scheme not in SCHEMES:
            raise FormatError(f"int{self.bits}: unknown scheme {self.scheme!r} (one of {', '.join(SCHEMES)})")
        check_group(f"int{self.bits}", self.group_size, self.per_tensor)
        if self.scheme == "pow2" and (self.group_size is None or self.per_tensor):
            raise FormatError(f"bfp{self.bits}: block floating point needs a block size (e.g. -g32)")

    @property
    def requires_whole_groups(self) -> bool:  # type: ignore[override]
        return self.scheme == "pow2"

    @property
    def name(self) -> str:
        if self.scheme == "pow2":
            return "mxint8" if (self.bits, self.group_size) == (8, 32) else f"bfp{self.bits}-g{self.group_size}"
        scheme = "" if self.scheme == "asym" else f"-{self.scheme}"
        return f"int{self.bits}{scheme}{granularity_suffix(self.group_size, self.per_tensor)}"

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def group_overhead_bits(self) -> int:
        # sym: fp16 scale; asym: fp16 scale + b-bit zero point; fmin: fp16 scale + fp16 min;
        # pow2: one E8M0 exponent.
        return {"sym": 16, "asym": 16 + self.bits, "fmin": 32, "pow2": 8}[self.scheme]

    @property
    def qmax(self) -> int:
        """Largest code of the symmetric grid."""
        return 2 ** (self.bits - 1) - 1

    @property
    def levels(self) -> int:
        """Largest unsigned code of the asymmetric grid."""
        return 2**self.bits - 1

    def fit(self, x: Tensor) -> Params:
        x = x.float()
        if self.scheme == "sym":
            amax = x.abs().amax(dim=1, keepdim=True)
            scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax))
            return {"scale": fp16_round(scale)}
        if self.scheme == "asym":
            # min-max grid that always contains 0 (as GPTQ's quant.py)
            xmin = x.amin(dim=1, keepdim=True).clamp(max=0)
            xmax = x.amax(dim=1, keepdim=True).clamp(min=0)
            both_zero = (xmin == 0) & (xmax == 0)
            xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
            xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
            scale = fp16_round((xmax - xmin) / self.levels)
            zero = torch.round(-xmin / scale).clamp(0, self.levels)
            return {"scale": scale, "zero": zero - 2 ** (self.bits - 1)}
        if self.scheme == "fmin":
            # d = (max - min) / (2^b - 1), m = min, both 16-bit, as ggml's Q4_1
            xmin = x.amin(dim=1, keepdim=True)
            xmax = x.amax(dim=1, keepdim=True)
            span = xmax - xmin
            scale = fp16_round(torch.where(span > 0, span / self.levels, torch.ones_like(span)))
            return {"scale": scale, "min": xmin.to(torch.float16).float()}
        amax = x.abs().amax(dim=1, keepdim=True)
        exp = torch.where(amax > 0, floor_log2(amax), torch.zeros_like(amax))
        return {"exp": exp.clamp(E8M0_MIN, E8M0_MAX)}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        x = x.float()
        half = 2 ** (self.bits - 1)
        if self.scheme == "sym":
            q = torch.round(x / params["scale"]).clamp(-self.qmax, self.qmax)
        elif self.scheme == "asym":
            q = (torch.round(x / params["scale"]) + params["zero"] + half).clamp(0, self.levels) - half
        elif self.scheme == "fmin":
            q = torch.round((x - params["min"]) / params["scale"]).clamp(0, self.levels) - half
        else:  # pow2: sign-magnitude with b-2 fraction bits (OCP MXINT8 for b=8)
            q = torch.round(x * torch.exp2(self.bits - 2 - params["exp"])).clamp(-self.qmax, self.qmax)
        return q.to(torch.int8)

    def round(self, x: Tensor, params: Params) -> Tensor:
        """decode(encode(x)) in fewer kernels (solvers call it once per column)."""
        x = x.float()
        if self.scheme == "asym":
            half = 2 ** (self.bits - 1)
            z, s = params["zero"], params["scale"]
            return (torch.round(x / s) + z).clamp_(-half, half - 1).sub_(z).mul_(s)
        if self.scheme == "sym":
            s = params["scale"]
            return torch.round(x / s).clamp_(-self.qmax, self.qmax).mul_(s)
        return super().round(x, params)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        q = codes.float()
        if self.scheme == "sym":
            return q * params["scale"]
        if self.scheme == "asym":
            return (q - params["zero"]) * params["scale"]
        if self.scheme == "fmin":
            return (q + 2 ** (self.bits - 1)) * params["scale"] + params["min"]
        return q * torch.exp2(params["exp"] - (self.bits - 2))


@register_family("int", "integer: intB[-sym|-fmin][-gG|-tensor] (default asymmetric, integer zero point, per-channel)")
def _parse_int(bits: int, tokens: list[str]) -> Format:
    schemes = ("sym", "asym", "fmin")
    group, per_tensor, others = group_tokens(f"int{bits}", tokens, set(schemes))
    scheme = exclusive(spelled(f"int{bits}", tokens), others, "scheme", schemes) or "asym"
    return IntFormat(bits, scheme, group, per_tensor)


@register_family("bfp", "block floating point: bfpB-gG (shared E8M0 exponent per block)")
def _parse_bfp(bits: int, tokens: list[str]) -> Format:
    group, _, _ = group_tokens(f"bfp{bits}", tokens, set(), granularity=("gN",))
    return IntFormat(bits, "pow2", 16 if group is None else group)


@register_family("mxint", "OCP MXINT8: mxint8 (int8 elements, E8M0 scale, block 32)")
def _parse_mxint(bits: int, tokens: list[str]) -> Format:
    if bits != 8 or tokens:
        raise FormatError(f"mxint{bits}{''.join('-' + t for t in tokens)}: OCP defines only mxint8; use bfpB-gG")
    return IntFormat(8, "pow2", 32)
