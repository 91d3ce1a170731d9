"""mixq's integer codes rewritten into each kernel's operands, and each kernel's dequantisation.

mixq stores signed codes ``c`` (the unsigned grid shifted by ``2^(b-1)``) with per-group
parameters (see ``mixq.formats.integer``):

* ``asym``: ``w = (c - zero) * scale`` (integer zero point, also shifted),
* ``sym``:  ``w = c * scale``,
* ``fmin``: ``w = (c + 2^(b-1)) * scale + min``.

A kernel needs groups of one width that tile the row; mixq's last group of a row may be
shorter.  Both are served by *kernel groups* of width ``G`` dividing mixq's group and the
row (so no kernel group straddles two of mixq's), each repeating its mixq group's
parameters: the dequantised weights are unchanged.  Codes and parameters are the solver's;
nothing here looks at a float weight.

Every function is pure (tensors in, tensors out) and runs on any device, so the operands
and the dequantisation formulas are tested on CPU against ``Format.dequantize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.formats import IntFormat, QTensor

TINYGEMM_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm accepts (aten int4mm.cu)
TINYGEMM_INNER_K_TILES = (8, 4, 2)  # innerKTiles _convert_weight_to_int4pack accepts; K % (16 * t) == 0
TINYGEMM_N_TILE = 8  # output rows per tile of the packed layout
GEMLITE_BITS = (8, 4, 2, 1)  # GemLiteLinearTriton.SUPPORTED_BITS_TRITON minus 16
GEMLITE_ALIGN = 32  # gemlite: in_features and group sizes divisible by 32 (its README)
GEMLITE_K_MULTIPLE = 256  # its largest BLOCK_SIZE_K: 576-wide rows gave NaN at batch 16 on an H200 (gemlite 0.6.0.post2)


def kernel_group(fmt: IntFormat, cols: int, allowed: tuple[int, ...] | None) -> int | None:
    """Width of the kernel groups that reproduce ``fmt``'s groups on a row of ``cols``.

    ``allowed`` lists the widths a kernel takes, largest first (None: any multiple of
    ``GEMLITE_ALIGN``).  Per-channel and per-tensor parameters repeat over any width.
    None when no allowed width divides both mixq's group and the row.
    """
    if fmt.per_tensor or fmt.group_size is None:
        span = cols
    elif fmt.group_size > cols:
        return None  # the format does not apply to this row
    else:
        span = math.gcd(fmt.group_size, cols)
    if allowed is None:
        return span if span % GEMLITE_ALIGN == 0 else None
    return next((g for g in allowed if span % g == 0), None)


def per_group(fmt: IntFormat, q: QTensor, width: int) -> dict[str, Tensor]:
    """``q``'s parameters as ``[rows, cols // width]`` tensors, one per kernel group."""
    rows, cols = q.codes.shape
    full = {k: v.expand(rows, cols) for k, v in fmt.expand(q).items()}  # per tensor: [1, 1] -> every weight
    return {k: v[:, ::width].float().contiguous() for k, v in full.items()}


# -- torchao int4: tinygemm (aten._weight_int4pack_mm) ----------------------------------
@dataclass(frozen=True)
class TinyGemmOperands:
    """``w = (u - 8) * scale + zero`` per kernel group of ``group`` columns, ``u`` in 0..15.

    This is tinygemm's convention (torchao's ``_dequantize_affine_tinygemm``: the zero point
    is a float added after scaling, the codes centred on the mid point 8).  From mixq,
    with the signed code ``c = u - 8``: asym ``zero = -zero_point * scale``; sym
    ``zero = 0``; fmin ``zero = 8 * scale + min``.
    """

    codes: Tensor  # int32 [rows, cols], 0..15
    scale: Tensor  # float32 [rows, cols // group]
    zero: Tensor  # float32 [rows, cols // group]
    group: int


def tinygemm_operands(fmt: IntFormat, q: QTensor) -> TinyGemmOperands:
    if fmt.bits != 4 or fmt.scheme not in ("asym", "sym", "fmin"):
        raise ValueError(f"tinygemm takes 4-bit integer codes, not {fmt.name}")
    group = kernel_group(fmt, q.codes.shape[1], TINYGEMM_GROUPS)
    if group is None:
        raise ValueError(f"{fmt.name}: no tinygemm group size tiles a row of {q.codes.shape[1]}")
    p = per_group(fmt, q, group)
    scale = p["scale"]
    if fmt.scheme == "asym":
        zero = -p["zero"] * scale  # exact in float32: an integer below 2^8 times a 16-bit float
    elif fmt.scheme == "sym":
        zero = torch.zeros_like(scale)
    else:
        zero = 8 * scale + p["min"]
    return TinyGemmOperands((q.codes.to(torch.int32) + 8), scale, zero, group)


def tinygemm_scale_and_zero(ops: TinyGemmOperands, dtype: torch.dtype) -> Tensor:
    """The kernel's ``qScaleAndZeros``: ``[cols // group, rows, 2]`` (as torchao's
    ``pack_tinygemm_scales_and_zeros``)."""
    return torch.stack([ops.scale, ops.zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def tinygemm_inner_k_tiles(cols: int) -> int | None:
    return next((t for t in TINYGEMM_INNER_K_TILES if cols % (16 * t) == 0), None)


def tinygemm_nibbles(codes: Tensor) -> Tensor:
    """``[rows, cols]`` 0..15 -> ``[rows, cols // 2]`` uint8, even column in the high nibble:
    the input of ``aten._convert_weight_to_int4pack`` (as torchao packs it)."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)


def tinygemm_dequantize(ops: TinyGemmOperands, dtype: torch.dtype) -> Tensor:
    """The weights the kernel multiplies by: scale and zero rounded to ``dtype`` (the
    kernel's, bfloat16 on CUDA), then one fused multiply-add rounded to ``dtype``."""
    s = ops.scale.to(dtype).float().repeat_interleave(ops.group, dim=1)
    z = ops.zero.to(dtype).float().repeat_interleave(ops.group, dim=1)
    return ((ops.codes - 8).float() * s + z).to(dtype)


# -- gemlite: (W_q - zeros) * scales -------------------------------------------------------
@dataclass(frozen=True)
class GemliteOperands:
    """``w = (u - zero) * scale`` per kernel group, ``u`` unsigned ``bits``-bit codes and an
    integer ``zero``: gemlite's (and HQQ's) convention, packed with ``fma_mode=False``
    (its ``W_group_mode`` 3).  From mixq: ``u = c + 2^(b-1)``, asym ``zero = zero_point +
    2^(b-1)``, sym ``zero = 2^(b-1)``."""

    codes: Tensor  # uint8 [rows, cols]
    scale: Tensor  # float32 [rows, cols // group]
    zero: Tensor  # float32 [rows, cols // group], integers
    bits: int
    group: int


def gemlite_operands(fmt: IntFormat, q: QTensor) -> GemliteOperands:
    if fmt.bits not in GEMLITE_BITS or fmt.scheme not in ("asym", "sym"):
        raise ValueError(f"gemlite takes 8/4/2/1-bit integer codes with an integer zero point, not {fmt.name}")
    group = kernel_group(fmt, q.codes.shape[1], None)
    if group is None:
        raise ValueError(f"{fmt.name}: no group width divisible by {GEMLITE_ALIGN} tiles a row of {q.codes.shape[1]}")
    half = 2 ** (fmt.bits - 1)
    p = per_group(fmt, q, group)
    zero = p["zero"] + half if fmt.scheme == "asym" else torch.full_like(p["scale"], float(half))
    return GemliteOperands((q.codes.to(torch.int16) + half).to(torch.uint8), p["scale"], zero, fmt.bits, group)


def gemlite_dequantize(ops: GemliteOperands, dtype: torch.dtype) -> Tensor:
    """gemlite's ``dequantize`` for ``W_group_mode`` 3 with parameters of ``dtype``:
    ``(u.to(dtype) - zero) * scale``, each operation rounded to ``dtype``."""
    s = ops.scale.to(dtype).repeat_interleave(ops.group, dim=1)
    z = ops.zero.to(dtype).repeat_interleave(ops.group, dim=1)
    return (ops.codes.to(dtype) - z) * s


# -- int8 weight-only (torchao's Int8Tensor weight-only path) -------------------------------
@dataclass(frozen=True)
class Int8Operands:
    """``w = (c - zero) * scale`` per output channel, ``c`` mixq's signed int8 codes; the
    kernel computes ``(x @ (c - zero)ᵀ) * scale`` (torchao's weight-only int8: a matmul on
    the cast codes, then the channel scale; the zero point, exact in 16-bit floats up to
    ±255, is subtracted from the cast codes)."""

    codes: Tensor  # int8 [rows, cols]
    scale: Tensor  # float32 [rows]
    zero: Tensor  # float32 [rows], integers


def int8_operands(fmt: IntFormat, q: QTensor) -> Int8Operands:
    if fmt.bits != 8 or fmt.scheme not in ("asym", "sym") or fmt.group_size is not None:
        raise ValueError(f"int8 weight-only takes per-channel or per-tensor 8-bit codes, not {fmt.name}")
    p = per_group(fmt, q, q.codes.shape[1])
    zero = p["zero"][:, 0] if fmt.scheme == "asym" else torch.zeros_like(p["scale"][:, 0])
    return Int8Operands(q.codes.to(torch.int8), p["scale"][:, 0].contiguous(), zero.contiguous())


def int8_dequantize(ops: Int8Operands, dtype: torch.dtype) -> Tensor:
    """The weights ``(c - zero) * scale``, as a ``dtype`` matmul sees them before its
    output is scaled (the integer part is exact; the scale is applied in ``dtype``)."""
    return (ops.codes.to(dtype) - ops.zero.to(dtype)[:, None]) * ops.scale.to(dtype)[:, None]
