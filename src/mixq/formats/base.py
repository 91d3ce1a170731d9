"""The format interface shared by every number format.

A format quantizes a 2-D weight ``[rows, cols]`` (a Linear weight is ``[out, in]``)
group by group along its columns.  Every group holds the consecutive weights of one
row, so a row of 576 with groups of 128 has four groups of 128 and one of 64.

Three small verbs let solvers (RTN, GPTQ, ...) work with any format:

* ``fit(x)``: ``x`` is ``[n, k]``, one group per row; returns the group parameters
  (scales, zero points, shared exponents) as a dict of ``[n, 1]`` tensors.
* ``encode(x, params)``: integer codes of ``x`` under broadcastable ``params``.
* ``decode(codes, params)``: the values those codes stand for.

``quantize``/``dequantize`` apply them to a whole weight, and ``storage_bits`` counts
exactly what would be stored: codes, scales, zero points, shared exponents.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.errors import FormatError

Params = dict[str, Tensor]


@dataclass(frozen=True)
class QTensor:
    """A quantized weight: integer codes plus per-group parameters."""

    fmt: str  # canonical format name
    codes: Tensor  # same shape as the weight
    params: Params  # each [rows, groups] (or [1, 1] per tensor)
    group_size: int  # columns per group (the last group of a row may be shorter)


FP16_MIN = 2.0**-24  # smallest positive fp16 value (a subnormal); the smallest normal is 2^-14
FP16_MAX = 65504.0  # largest finite fp16 value


def fp16_round(x: Tensor) -> Tensor:
    """Round a positive parameter (a scale) to what a 16-bit float stores, keeping it
    finite and non-zero: values below 2^-24 become 2^-24, subnormals are kept."""
    return x.clamp(min=FP16_MIN, max=FP16_MAX).to(torch.float16).to(x.dtype)


def floor_log2(x: Tensor) -> Tensor:
    """``floor(log2(x))`` of positive ``x``, exactly (``torch.log2`` rounds 8 - 2^-21 up to 3)."""
    return (torch.frexp(x).exponent - 1).to(x.dtype)


class Format(ABC):
    """A number format for weights. Subclasses are frozen dataclasses registered by family."""

    #: columns per group; None means one group per row (per-channel)
    group_size: int | None
    per_tensor: bool

    # -- identity ---------------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str:
        """Canonical name; ``parse_format(f.name) == f``."""

    @property
    @abstractmethod
    def code_bits(self) -> int:
        """Bits of one stored code."""

    @property
    @abstractmethod
    def group_overhead_bits(self) -> int:
        """Bits stored once per group (scale, zero point, minimum, shared exponent)."""

    requires_whole_groups: bool = False  # block formats (MX, BFP) need groups that divide rows

    # -- maths ------------------------------------------------------------------
    @abstractmethod
    def fit(self, x: Tensor) -> Params:
        """Parameters of each row of ``x`` taken as one group; tensors of shape [n, 1]."""

    @abstractmethod
    def encode(self, x: Tensor, params: Params) -> Tensor:
        """Codes of ``x`` under ``params`` (broadcastable to ``x``)."""

    @abstractmethod
    def decode(self, codes: Tensor, params: Params) -> Tensor:
        """Values (float32) of ``codes`` under ``params``."""

    def round(self, x: Tensor, params: Params) -> Tensor:
        """Quantize-dequantize ``x`` on the grid given by ``params``."""
        return self.decode(self.encode(x, params), params)

    def column_params(self, params: Params, offset: int) -> Params:
        """The parameters that ``encode``/``decode`` take for column ``offset`` of a group,
        from the group's own (``fit``'s); formats whose groups hold sub-blocks override it."""
        return params

    # -- geometry ---------------------------------------------------------------
    def group_width(self, cols: int) -> int:
        """Columns per group for a row of ``cols`` weights (validated)."""
        if self.per_tensor or self.group_size is None:
            return cols
        if self.group_size > cols:
            raise FormatError(
                f"{self.name}: group size {self.group_size} exceeds the row width {cols}; "
                "use a smaller group or per-channel"
            )
        if self.requires_whole_groups and cols % self.group_size:
            raise FormatError(
                f"{self.name}: block size {self.group_size} does not divide the row width {cols}"
            )
        return self.group_size

    def num_groups(self, shape: tuple[int, ...]) -> int:
        rows, cols = _as_2d(shape)
        if self.per_tensor:
            return 1
        return rows * math.ceil(cols / self.group_width(cols))

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits to store a weight of this shape: codes plus per-group parameters."""
        rows, cols = _as_2d(shape)
        return rows * cols * self.code_bits + self.num_groups(shape) * self.group_overhead_bits

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        rows, cols = _as_2d(shape)
        return self.storage_bits(shape) / (rows * cols)

    # -- whole tensors ----------------------------------------------------------
    def quantize(self, w: Tensor) -> QTensor:
        x = checked_weight(self.name, w)
        rows, cols = x.shape
        if self.per_tensor:
            params = self.fit(x.reshape(1, -1))
            codes = self.encode(x, params)
            return QTensor(self.name, codes, params, cols)
        g = self.group_width(cols)
        nfull, tail = divmod(cols, g)
        parts: list[tuple[Tensor, Params]] = []
        if nfull:
            main = x[:, : nfull * g].reshape(rows * nfull, g)
            p = self.fit(main)
            parts.append((self.encode(main, p).reshape(rows, nfull * g), {k: v.reshape(rows, nfull) for k, v in p.items()}))
        if tail:
            rest = x[:, nfull * g :]
            p = self.fit(rest)
            parts.append((self.encode(rest, p), p))
        codes = torch.cat([c for c, _ in parts], dim=1)
        params = {k: torch.cat([p[k] for _, p in parts], dim=1) for k in parts[0][1]}
        return QTensor(self.name, codes, params, g)

    def expand(self, q: QTensor) -> Params:
        """Per-group parameters broadcast to one value per weight."""
        rows, cols = q.codes.shape
        if self.per_tensor or not q.params:
            return q.params
        ngroups = next(iter(q.params.values())).shape[1]
        widths = torch.full((ngroups,), q.group_size, device=q.codes.device)
        widths[-1] = cols - q.group_size * (ngroups - 1)
        return {k: v.repeat_interleave(widths, dim=1) for k, v in q.params.items()}

    def dequantize(self, q: QTensor) -> Tensor:
        return self.decode(q.codes, self.expand(q))

    def fake_quantize(self, w: Tensor) -> Tensor:
        """``dequantize(quantize(w))`` in the weight's dtype."""
        return self.dequantize(self.quantize(w)).to(w.dtype)

    def __str__(self) -> str:
        return self.name


def checked_weight(name: str, w: Tensor) -> Tensor:
    """``w`` as float32, refused unless it is a finite 2-D weight."""
    if w.dim() != 2:
        raise FormatError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    x = w.detach().float()
    if not torch.isfinite(x).all():
        raise FormatError(f"{name}: the weight holds NaN or infinite values")
    return x


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise FormatError(f"expected a 2-D weight shape, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def granularity_suffix(group_size: int | None, per_tensor: bool) -> str:
    if per_tensor:
        return "-tensor"
    return "" if group_size is None else f"-g{group_size}"


def check_group(name: str, group_size: int | None, per_tensor: bool) -> None:
    if group_size is not None and group_size < 1:
        raise FormatError(f"{name}: group size must be a positive integer, got {group_size}")
    if per_tensor and group_size is not None:
        raise FormatError(f"{name}: a per-tensor format has no group size")
