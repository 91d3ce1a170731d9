"""ggml's k-quants (GGUF types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as formats: ``q2-k`` ... ``q6-k``.

A k-quant cuts a row into super-blocks of 256 weights (the format's group; rows must be
a multiple of 256). A super-block holds sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K,
Q5_K) weights, each with a quantized scale ``sc_j`` and, for Q2_K/Q4_K/Q5_K, a quantized
minimum ``m_j``, and one fp16 super-block scale ``d`` (and ``dmin``). A weight is

    (d·sc_j)·q − dmin·m_j   with q in [0, 2^b − 1]   (Q2_K, Q4_K, Q5_K)
    (d·sc_j)·q              with q in [−2^(b−1), 2^(b−1) − 1]   (Q3_K, Q6_K)

=======  ====================  =========================  ============  ===========
type     sub-blocks            sub-block scale (min)       super-block   bits/weight
=======  ====================  =========================  ============  ===========
Q2_K     16 × 16               4-bit unsigned (4-bit)      d, dmin fp16  2.625
Q3_K     16 × 16               6-bit signed (stored +32)   d fp16        3.4375
Q4_K     8 × 32                6-bit unsigned (6-bit)      d, dmin fp16  4.5
Q5_K     8 × 32                6-bit unsigned (6-bit)      d, dmin fp16  5.5
Q6_K     16 × 16               int8                        d fp16        6.5625
=======  ====================  =========================  ============  ===========

Codes are signed as for the integer formats: ``q − 2^(b−1)`` for the types with a minimum,
``q`` itself for Q3_K and Q6_K. Parameters are ``d`` (and ``dmin``) and one entry per
sub-block, ``scNN`` (and ``mNN``), each holding the integer the file stores (Q3_K's
signed value), so every parameter is one value per super-block, like any group parameter.
``d·sc_j`` and ``dmin·m_j`` are exact in float32 (an fp16 times an integer of at most
8 bits), so decoding computes exactly what ``gguf.quants.dequantize`` computes from the
bytes ``to_ggml`` writes.

``quantize`` ports ggml's reference quantizers (``quantize_row_q{2..6}_K_ref`` with
``make_qkx2_quants``, ``make_q3_quants`` and ``make_qx_quants`` in llama.cpp's
ggml/src/ggml-quants.c) operation for operation in float32, vectorised over sub-blocks:
sums run in ggml's order, ``nearest_int`` is reproduced bit for bit, divisions are true
divisions. The ``gguf`` package can only dequantize k-quants and no library exposes ggml's
quantizer to Python, hence the port. It reproduces ggml's bytes when ggml is compiled
without fused multiply-adds (its C makes no use of them; a compiler may contract them on
its own with ``-ffp-contract=fast``). ``encode`` of values off the grid saturates, where
ggml's ``nearest_int`` is undefined beyond 2^22 steps. GPTQ and QuantEase fit a super-block
once and round its columns on their sub-blocks' scales (``column_params``), in their PyTorch
column loop (the fused kernels cover the integer formats only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mixq.errors import FormatError
from mixq.formats.base import Format, Params, QTensor, checked_weight
from mixq.formats.registry import register_family

QK_K = 256  # weights per super-block (ggml-common.h)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a (sub-)block below this is all zero
CPU_CHUNK = 128  # super-blocks per search on CPU (see KQuantFormat._fit)


@dataclass(frozen=True)
class _Layout:
    sub: int  # weights per sub-block
    scale_bits: int  # bits of one stored sub-block scale (and of one minimum)
    has_min: bool
    block_bytes: int  # sizeof(block_qB_K) in ggml-common.h


LAYOUTS = {2: _Layout(16, 4, True, 84), 3: _Layout(16, 6, False, 110), 4: _Layout(32, 6, True, 144),
           5: _Layout(32, 6, True, 176), 6: _Layout(16, 8, False, 210)}


@dataclass(frozen=True)
class KQuantFormat(Format):
    bits: int
    group_size: int | None = field(default=QK_K, init=False)
    per_tensor: bool = field(default=False, init=False)
    requires_whole_groups = True

    def __post_init__(self) -> None:
        if self.bits not in LAYOUTS:
            raise FormatError(f"q{self.bits}-k: k-quants exist for 2 to 6 bits (q2-k ... q6-k)")

    @property
    def layout(self) -> _Layout:
        return LAYOUTS[self.bits]

    @property
    def name(self) -> str:
        return f"q{self.bits}-k"

    @property
    def ggml_type(self) -> str:
        """The GGUF tensor type's name (``gguf.GGMLQuantizationType[...]``)."""
        return f"Q{self.bits}_K"

    @property
    def nsub(self) -> int:
        return QK_K // self.layout.sub

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def group_overhead_bits(self) -> int:
        lay = self.layout
        per_sub = lay.scale_bits * (2 if lay.has_min else 1)
        return self.nsub * per_sub + 16 * (2 if lay.has_min else 1)  # + fp16 d (and dmin)

    def param_bits(self, name: str) -> int | None:
        """Bits one stored value of parameter ``name`` takes (the sub-block scales and minima, counted at
        the layout's width); None for the fp16 super-block scales ``d`` and ``dmin``."""
        return self.layout.scale_bits if name[:2] in ("sc", "m0", "m1") else None

    def group_width(self, cols: int) -> int:
        if cols % QK_K:
            raise FormatError(f"{self.name}: k-quants need rows that are a multiple of {QK_K} weights, "
                              f"got {cols} (llama.cpp falls back to Q5_0/Q5_1/Q8_0 on such rows)")
        return QK_K

    # -- maths ------------------------------------------------------------------
    def fit(self, x: Tensor) -> Params:
        return self._fit(x)[0]

    def _fit(self, x: Tensor) -> tuple[Params, Tensor]:
        """Parameters and codes of each super-block (a row of ``x``, [n, 256]) as ggml's
        reference quantizer gives them (where a sub-block's scale is 0, ggml keeps the codes
        of its scale search)."""
        if x.shape[-1] != QK_K:
            raise FormatError(f"{self.name}: a k-quant group is one super-block of {QK_K} weights, got {x.shape[-1]}")
        x = x.float().contiguous()
        # on CPU, 128 super-blocks at a time keep every tensor of the searches (32,768 floats)
        # in cache and within ATen's parallel grain (32,768), where thread hand-offs outweigh
        # the work; on a GPU the whole weight at once
        step = max(x.shape[0], 1) if x.is_cuda else CPU_CHUNK
        parts = [_QUANTIZERS[self.bits](x[i : i + step]) for i in range(0, x.shape[0], step)]
        d, sc, dmin, m, levels = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
        params = {"d": d.unsqueeze(1), **{f"sc{j:02d}": sc[:, j : j + 1] for j in range(self.nsub)}}
        if dmin is not None and m is not None:
            params["dmin"] = dmin.unsqueeze(1)
            params.update({f"m{j:02d}": m[:, j : j + 1] for j in range(self.nsub)})
        return params, (levels - 2 ** (self.bits - 1)).to(torch.int8)

    def column_params(self, params: Params, offset: int) -> Params:
        if "scale" in params:
            return params
        j = f"{offset // self.layout.sub:02d}"
        out = {"scale": params["d"] * params[f"sc{j}"]}
        if self.layout.has_min:
            out["min"] = params["dmin"] * params[f"m{j}"]
        return out

    def _scale_min(self, params: Params, cols: int) -> tuple[Tensor, Tensor | None]:
        """Per-weight (or broadcastable) ``d·sc_j`` and ``dmin·m_j``: from ``expand``'s or
        ``column_params``' values as given, or from one super-block's parameters."""
        if "scale" in params:
            return params["scale"], params.get("min")
        if cols != QK_K:
            raise FormatError(f"{self.name}: super-block parameters apply to {QK_K} columns, got {cols}")
        sub = self.layout.sub
        sc = torch.cat([params[f"sc{j:02d}"] for j in range(self.nsub)], dim=1)
        scale = (params["d"] * sc).repeat_interleave(sub, dim=1)
        if not self.layout.has_min:
            return scale, None
        m = torch.cat([params[f"m{j:02d}"] for j in range(self.nsub)], dim=1)
        return scale, (params["dmin"] * m).repeat_interleave(sub, dim=1)

    def encode(self, x: Tensor, params: Params) -> Tensor:
        x = x.float()
        scale, mn = self._scale_min(params, x.shape[-1])
        half = 2 ** (self.bits - 1)
        zero = scale == 0
        safe = torch.where(zero, torch.ones_like(scale), scale)
        if mn is not None:  # ggml: nearest_int((x + dmin·m_j) / (d·sc_j)) clamped to [0, 2^b − 1]
            q = torch.round((x + mn) / safe).clamp_(0, 2 * half - 1).sub_(half)
            q = torch.where(zero, torch.full_like(q, -half), q)
        else:  # nearest_int(x / (d·sc_j)) clamped to [−2^(b−1), 2^(b−1) − 1]
            q = torch.round(x / safe).clamp_(-half, half - 1)
            q = torch.where(zero, torch.zeros_like(q), q)
        return q.to(torch.int8)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        scale, mn = self._scale_min(params, codes.shape[-1])
        if mn is None:
            return scale * codes.float()
        return scale * (codes.float() + 2 ** (self.bits - 1)) - mn

    # -- whole tensors ----------------------------------------------------------
    def quantize(self, w: Tensor) -> QTensor:
        """ggml's reference quantization of every super-block (bit for bit, see the module doc)."""
        x = checked_weight(self.name, w)
        rows, cols = x.shape
        self.group_width(cols)
        params, codes = self._fit(x.reshape(-1, QK_K))
        return QTensor(self.name, codes.reshape(rows, cols), {k: v.reshape(rows, -1) for k, v in params.items()}, QK_K)

    def expand(self, q: QTensor) -> Params:
        rows, cols = q.codes.shape
        groups, sub = cols // QK_K, self.layout.sub

        def per_weight(scale: str, subs: str) -> Tensor:
            s = torch.stack([q.params[f"{subs}{j:02d}"] for j in range(self.nsub)], dim=-1)  # [rows, groups, nsub]
            return (q.params[scale].unsqueeze(-1) * s).repeat_interleave(sub, dim=-1).reshape(rows, groups * QK_K)

        out = {"scale": per_weight("d", "sc")}
        if self.layout.has_min:
            out["min"] = per_weight("dmin", "m")
        return out

    # -- ggml's bytes -----------------------------------------------------------
    def to_ggml(self, q: QTensor) -> np.ndarray:
        """The tensor as ggml stores it: uint8 [rows, super-blocks per row × block bytes]."""
        rows, cols = q.codes.shape
        n = rows * cols // QK_K
        level = (q.codes.detach().cpu().reshape(n, QK_K).long() + 2 ** (self.bits - 1)).numpy().astype(np.uint8)
        p = {k: v.detach().cpu().reshape(n) for k, v in q.params.items()}
        sc = np.stack([p[f"sc{j:02d}"].numpy() for j in range(self.nsub)], axis=1)
        d = fp16_bytes(p["d"])
        if self.layout.has_min:
            m = np.stack([p[f"m{j:02d}"].numpy() for j in range(self.nsub)], axis=1)
            dmin = fp16_bytes(p["dmin"])
        if self.bits == 2:
            scales = (sc.astype(np.uint8) & 0xF) | (m.astype(np.uint8) << 4)
            out = np.concatenate([scales, _pack2(level), d, dmin], axis=1)
        elif self.bits == 3:
            hmask = np.packbits((level >= 4).reshape(n, 8, 32), axis=1, bitorder="little").reshape(n, 32)
            out = np.concatenate([hmask, _pack2(level & 3), _pack_q3_scales((sc + 32).astype(np.uint8)), d], axis=1)
        elif self.bits in (4, 5):
            blocks = [d, dmin, _pack_k4_scales(sc.astype(np.uint8), m.astype(np.uint8))]
            if self.bits == 5:
                blocks.append(np.packbits((level >= 16).reshape(n, 8, 32), axis=1, bitorder="little").reshape(n, 32))
            lo = (level & 0xF).reshape(n, 4, 2, 32)
            blocks.append((lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128))
            out = np.concatenate(blocks, axis=1)
        else:
            lv = level.reshape(n, 2, 4, 32)  # two halves of 128, each four runs of 32
            ql = np.concatenate([lv[:, :, 0] & 0xF | (lv[:, :, 2] & 0xF) << 4,
                                 lv[:, :, 1] & 0xF | (lv[:, :, 3] & 0xF) << 4], axis=2).reshape(n, 128)
            hi = lv >> 4
            qh = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(n, 64)
            out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d], axis=1)
        assert out.shape[1] == self.layout.block_bytes
        return np.ascontiguousarray(out).reshape(rows, cols // QK_K * self.layout.block_bytes)

    def from_ggml(self, data: np.ndarray, shape: tuple[int, int]) -> QTensor:
        """The codes and parameters held by ggml's bytes ([rows, bytes per row] uint8) of a weight of ``shape``."""
        rows, cols = shape
        self.group_width(cols)
        n = rows * cols // QK_K
        b = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, self.layout.block_bytes)
        m = dmin = None
        if self.bits == 2:
            scales, qs, d, dmin = np.split(b, [16, 80, 82], axis=1)
            sc, m = scales & 0xF, scales >> 4
            level = _unpack2(qs)
        elif self.bits == 3:
            hmask, qs, scales, d = np.split(b, [32, 96, 108], axis=1)
            sc = _unpack_q3_scales(scales).astype(np.int16) - 32
            high = np.unpackbits(hmask.reshape(n, 1, 32), axis=1, count=8, bitorder="little").reshape(n, QK_K)
            level = _unpack2(qs) | high << 2
        elif self.bits in (4, 5):
            d, dmin, scales, rest = np.split(b, [2, 4, 16], axis=1)
            sc, m = _unpack_k4_scales(scales)
            qh, qs = (None, rest) if self.bits == 4 else np.split(rest, [32], axis=1)
            level = np.stack([qs.reshape(n, 4, 32) & 0xF, qs.reshape(n, 4, 32) >> 4], axis=2).reshape(n, QK_K)
            if qh is not None:
                level = level | np.unpackbits(qh.reshape(n, 1, 32), axis=1, count=8, bitorder="little").reshape(n, QK_K) << 4
        else:
            ql, qh, scales, d = np.split(b, [128, 192, 208], axis=1)
            sc = scales.view(np.int8)
            ql, qh = ql.reshape(n, 2, 2, 32), qh.reshape(n, 2, 1, 32)
            lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
            hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
            level = (lo | hi << 4).reshape(n, QK_K)
        codes = torch.from_numpy(level.astype(np.int16) - 2 ** (self.bits - 1)).to(torch.int8).reshape(rows, cols)
        per_row = cols // QK_K

        def col(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a).astype(np.float32)).reshape(rows, per_row)

        params = {"d": col(d.view(np.float16))}
        params.update({f"sc{j:02d}": col(sc[:, j]) for j in range(self.nsub)})
        if dmin is not None and m is not None:
            params["dmin"] = col(dmin.view(np.float16))
            params.update({f"m{j:02d}": col(m[:, j]) for j in range(self.nsub)})
        return QTensor(self.name, codes, params, QK_K)


@register_family("q", "ggml k-quants: q2-k ... q6-k (GGUF Q2_K ... Q6_K: 256-weight super-blocks, quantized sub-block scales)")
def _parse_kquant(bits: int, tokens: list[str]) -> Format:
    if tokens != ["k"]:
        raise FormatError(f"q{bits}{''.join('-' + t for t in tokens)}: the q family holds ggml's k-quants, "
                          f"spelled q{bits}-k (Q{bits}_K)")
    return KQuantFormat(bits)


# -- ggml's byte layouts ------------------------------------------------------------------
def fp16_bytes(x: Tensor) -> np.ndarray:
    """fp16 values as ggml stores them: two little-endian bytes each, [n, 2]."""
    return x.detach().cpu().reshape(-1).numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)


def _pack2(level: np.ndarray) -> np.ndarray:
    """2-bit levels of 256 weights into 64 bytes: byte 32h + l holds weights 128h + l + 32s at bits 2s."""
    lv = level.reshape(-1, 2, 4, 32) & 3
    return (lv[:, :, 0] | lv[:, :, 1] << 2 | lv[:, :, 2] << 4 | lv[:, :, 3] << 6).reshape(-1, 64)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and mins in 12 bytes (``get_scale_min_k4``'s inverse)."""
    return np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                           (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], axis=1)


def _unpack_k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | (b[:, 0:4] >> 6) << 4], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | (b[:, 4:8] >> 6) << 4], axis=1)
    return sc, m


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit values in 12 bytes: low nibbles of 0-7 and 8-15 in bytes 0-7, the
    high 2 bits of value j in byte 8 + j%4 at bit 2·(j/4)."""
    low = (l6[:, :8] & 0xF) | (l6[:, 8:] & 0xF) << 4
    hi = (l6 >> 4).reshape(-1, 4, 4)  # [n, j/4, j%4]
    high = hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def _unpack_q3_scales(b: np.ndarray) -> np.ndarray:
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    high = (b[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    return low | high.reshape(-1, 16) << 4


# -- ggml's reference quantizers, in float32 ------------------------------------------------
def _f32(v: float) -> np.float32:
    return np.float32(v)


def _const(v: float | np.float32, like: Tensor) -> Tensor:
    return torch.tensor(float(v), dtype=torch.float32, device=like.device)


def _div(a: Tensor | float | np.float32, b: Tensor | float | np.float32) -> Tensor:
    """IEEE division ``a / b`` (PyTorch's ``scalar / tensor`` multiplies by a reciprocal instead)."""
    like = a if isinstance(a, Tensor) else b
    assert isinstance(like, Tensor)
    return torch.div(a if isinstance(a, Tensor) else _const(a, like), b if isinstance(b, Tensor) else _const(b, like))


def _nearest_int(f: Tensor) -> Tensor:
    """ggml's ``nearest_int``: add 1.5·2^23 in float32 and read the mantissa (round half to even)."""
    return ((f + _const(12582912.0, f)).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _sqrt(x: Tensor) -> Tensor:
    """``sqrtf``, correctly rounded (PyTorch's float32 sqrt on CPU can be one ulp off; the
    float64 root rounded to float32 is exact)."""
    return torch.sqrt(x.double()).float()


def _fp16(x: Tensor) -> Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``: round to nearest even fp16."""
    return x.to(torch.float16).to(torch.float32)


def _first_absmax(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(max |x|, the x holding it) along ``dim``, the first one on ties (ggml's ``ax > amax``)."""
    amax, idx = x.abs().max(dim=dim, keepdim=True)
    return amax.squeeze(dim), x.gather(dim, idx).squeeze(dim)


def _positive_max(x: Tensor) -> Tensor:
    """ggml's ``max = 0; if (v > max) max = v`` along the last axis."""
    m = x.amax(dim=-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


# The searches below take sub-blocks as columns: ``x`` is [weights per sub-block, sub-blocks],
# so that ggml's running sums over a sub-block's weights add contiguous rows.
def _sum(terms: Tensor, *, from_zero: bool = True) -> Tensor:
    """Σ over the rows of ``terms`` in ggml's order, in float32: ``acc = 0; acc += t_i``
    (or, ``from_zero=False``, ``acc = t_0`` then ``acc += t_i`` from i = 1)."""
    acc = torch.zeros_like(terms[0]) if from_zero else terms[0]
    for i in range(0 if from_zero else 1, terms.shape[0]):
        acc = acc + terms[i]
    return acc


def _error(w: Tensor, scale: Tensor, levels: Tensor, mn: Tensor, x: Tensor, use_mad: bool) -> Tensor:
    diff = scale * levels + mn - x
    return _sum(w * (diff.abs() if use_mad else diff * diff))


def _make_qkx2_quants(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx2_quants on each column of ``x``: (scale, the_min, levels in [0, nmax])."""
    mn, mx = x.amin(dim=0), x.amax(dim=0)
    sum_w = _sum(w, from_zero=False)
    sum_x = _sum(w * x, from_zero=False)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    iscale = _div(float(nmax), mx - mn)
    scale = _div(1.0, iscale)
    levels = _nearest_int(iscale * (x - mn)).clamp(0, nmax).float()
    best = _error(w, scale, levels, mn, x, use_mad)
    for step in range(nstep + 1):
        num = _f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)
        iscale = _div(num, mx - mn)  # ggml divides by the range to the best minimum so far
        aux = _nearest_int(iscale * (x - mn)).clamp(0, nmax).float()
        wl = w * aux
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * aux), _sum(wl * x)
        big_d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, big_d)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, big_d)
        clipped = this_min > 0
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(clipped, _div(sum_xl, sum_l2), this_scale)
        cur = _error(w, this_scale, aux, this_min, x, use_mad)
        better = (big_d > 0) & (cur < best)
        levels = torch.where(better, aux, levels)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, torch.zeros_like(scale), scale), -mn, torch.where(flat, 0.0, levels).long()


def _make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants(do_rmse=true) on each column of ``x``: (scale, levels in [0, 2·nmax − 1])."""
    amax, mx = _first_absmax(x, 0)
    lv = _nearest_int(_div(_const(-nmax, x), mx) * x).clamp(-nmax, nmax - 1).float()
    w = x * x
    sumlx = _sum(w * x * lv)
    suml2 = _sum(w * lv * lv)
    for _ in range(5):  # a pass that changes nothing would change nothing again: ggml's early exit is implied
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], lv[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = _nearest_int(_div(xi * sl2, slx)).clamp(-nmax, nmax - 1).float()
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    zero = amax < GROUP_MAX_EPS
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, lv + nmax).long()


def _make_qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_qx_quants(rmse_type=1, no weights) on each column of ``x``: (scale, levels in [0, 2·nmax − 1])."""
    amax, mx = _first_absmax(x, 0)
    w = x * x
    wx = w * x

    def levels_at(iscale: Tensor) -> Tensor:
        return _nearest_int(iscale * x).clamp(-nmax, nmax - 1).float()

    lv = levels_at(_div(_const(-nmax, x), mx))
    sumlx, suml2 = _sum(wx * lv), _sum(w * lv * lv)
    scale = torch.where(suml2 != 0, _div(sumlx, suml2), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand = levels_at(_div(_const(-(_f32(nmax) + _f32(0.1) * _f32(step)), x), mx))
        sumlx, suml2 = _sum(wx * cand), _sum(w * cand * cand)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        lv = torch.where(take, cand, lv)
        scale = torch.where(take, _div(sumlx, suml2), scale)
        best = torch.where(take, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0.0, lv + nmax).long()


def _columns(xs: Tensor) -> Tensor:
    """[n, nsub, sub] super-blocks -> [sub, n·nsub]: one sub-block per column."""
    return xs.reshape(-1, xs.shape[-1]).T.contiguous()


def _blocks(levels: Tensor, n: int) -> Tensor:
    """The inverse of ``_columns`` for the searches' levels."""
    return levels.T.reshape(n, -1, levels.shape[0])


Quantized = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]  # d, sc, dmin, m, levels


def _requantize(x: Tensor, d: Tensor, sc: Tensor, dmin: Tensor | None, m: Tensor | None, levels: Tensor,
                lo: int, hi: int) -> Tensor:
    """The final pass of every k-quant: levels on the stored scales, ggml's search levels where d·sc_j = 0."""
    dd = d.unsqueeze(1) * sc
    top = x if dmin is None or m is None else x + (dmin.unsqueeze(1) * m).unsqueeze(-1)
    safe = torch.where(dd == 0, torch.ones_like(dd), dd)
    new = _nearest_int(_div(top, safe.unsqueeze(-1))).clamp(lo, hi) - lo
    return torch.where((dd == 0).unsqueeze(-1), levels, new).reshape(x.shape[0], QK_K)


def _scales_with_min(xs: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
                     weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = xs.shape[0]
    scales, mins, levels = _make_qkx2_quants(_columns(xs), _columns(weights), nmax, rmin, rdelta, nstep, use_mad)
    return scales.reshape(n, -1), mins.reshape(n, -1), _blocks(levels, n)


def _q2_k(x: Tensor) -> Quantized:
    """quantize_row_q2_K_ref."""
    xs = x.reshape(-1, 16, 16)
    scales, mins, levels = _scales_with_min(xs, 3, -0.5, 0.1, 15, True, xs.abs())
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    q4scale = 15.0
    ls = _nearest_int(_div(q4scale, max_scale).unsqueeze(-1) * scales)
    lm = _nearest_int(_div(q4scale, max_min).unsqueeze(-1) * mins)
    byte = torch.where((max_scale > 0).unsqueeze(-1), ls & 0xFF, torch.zeros_like(ls))
    byte = torch.where((max_min > 0).unsqueeze(-1), byte | ((lm << 4) & 0xFF), byte)
    d = torch.where(max_scale > 0, _fp16(_div(max_scale, q4scale)), torch.zeros_like(max_scale))
    dmin = torch.where(max_min > 0, _fp16(_div(max_min, q4scale)), torch.zeros_like(max_min))
    sc, m = (byte & 0xF).float(), (byte >> 4).float()
    return d, sc, dmin, m, _requantize(xs, d, sc, dmin, m, levels, 0, 3)


def _q45_k(x: Tensor, nmax: int, rmin: float, nstep: int) -> Quantized:
    """quantize_row_q4_K_ref / quantize_row_q5_K_ref."""
    xs = x.reshape(-1, 8, 32)
    cols = _columns(xs)
    av_x = _sqrt(_div(_sum(cols * cols), 32.0))
    weights = (av_x + cols.abs()).T.reshape(xs.shape)
    scales, mins, levels = _scales_with_min(xs, nmax, rmin, 0.1, nstep, False, weights)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _div(63.0, max_min), zero)
    ls = (_nearest_int(inv_scale.unsqueeze(-1) * scales) & 0xFF).clamp(max=63)  # uint8, then MIN(63, .)
    lm = (_nearest_int(inv_min.unsqueeze(-1) * mins) & 0xFF).clamp(max=63)
    d, dmin = _fp16(_div(max_scale, 63.0)), _fp16(_div(max_min, 63.0))
    sc, m = ls.float(), lm.float()
    return d, sc, dmin, m, _requantize(xs, d, sc, dmin, m, levels, 0, nmax)


def _signed_scales(x: Tensor, search: Callable[[Tensor, int], tuple[Tensor, Tensor]],
                   nmax: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Q3_K/Q6_K's first pass: 16 sub-blocks of 16 searched for signed scales; (sub-blocks
    [n, 16, 16], scales [n, 16], levels [n, 16, 16], and the largest |scale| with its sign)."""
    xs = x.reshape(-1, 16, 16)
    n = xs.shape[0]
    scales, levels = search(_columns(xs), nmax)
    scales = scales.reshape(n, 16)
    max_abs, max_scale = _first_absmax(scales, -1)
    return xs, scales, _blocks(levels, n), max_abs, max_scale


def _q3_k(x: Tensor) -> Quantized:
    """quantize_row_q3_K_ref."""
    xs, scales, levels, _, max_scale = _signed_scales(x, _make_q3_quants, 4)
    nonzero = max_scale != 0
    iscale = _div(-32.0, torch.where(nonzero, max_scale, torch.ones_like(max_scale)))
    l8 = ((_nearest_int(iscale.unsqueeze(-1) * scales) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
    l6 = torch.where(nonzero.unsqueeze(-1), l8.clamp(-32, 31) + 32, torch.zeros_like(l8))
    d = torch.where(nonzero, _fp16(_div(1.0, iscale)), torch.zeros_like(max_scale))
    sc = (l6 - 32).float()
    return d, sc, None, None, _requantize(xs, d, sc, None, None, levels, -4, 3)


def _q6_k(x: Tensor) -> Quantized:
    """quantize_row_q6_K_ref."""
    xs, scales, levels, max_abs, max_scale = _signed_scales(x, _make_qx_quants, 32)
    zero = max_abs < GROUP_MAX_EPS  # the whole block is stored as zeros
    iscale = _div(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    s8 = ((_nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127) + 128) & 0xFF) - 128
    sc = torch.where(zero.unsqueeze(-1), torch.zeros_like(s8), s8).float()
    d = torch.where(zero, torch.zeros_like(max_scale), _fp16(_div(1.0, iscale)))
    levels = torch.where(zero.view(-1, 1, 1), 0, levels)
    return d, sc, None, None, _requantize(xs, d, sc, None, None, levels, -32, 31)


_QUANTIZERS = {
    2: _q2_k,
    3: _q3_k,
    4: lambda x: _q45_k(x, 15, -1.0, 20),  # quantize_row_q4_K_ref: make_qkx2_quants(32, 15, ..., -1, 0.1, 20)
    5: lambda x: _q45_k(x, 31, -0.5, 15),  # quantize_row_q5_K_ref: make_qkx2_quants(32, 31, ..., -0.5, 0.1, 15)
    6: _q6_k,
}
