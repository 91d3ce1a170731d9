"""Kernel operands from mixq's codes: each kernel's dequantisation reproduces mixq's weights."""

from __future__ import annotations

import pytest
import torch

from mixq.formats import parse_format
from mixq.runtime import packing
from mixq.runtime.modules import Int8WeightOnlyLinear, TinyGemmLinear


def _solved(name: str, rows: int = 24, cols: int = 576, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.05
    w[:, 7] += 0.4  # an outlying column: groups with very different ranges
    fmt = parse_format(name)
    return fmt, fmt.quantize(w)


@pytest.mark.parametrize(("name", "cols", "tiny", "gem"), [
    ("int4-g128", 576, 64, 64),  # 4 groups of 128 and a tail of 64
    ("int4-g128", 512, 128, 128),
    ("int4", 576, 64, 576),  # per channel: any width tiling the row
    ("int4-g96", 576, 32, 96),
    ("int4-g48", 576, None, None),  # 48: no tinygemm size divides it, not divisible by 32
    ("int4-tensor", 544, 32, 544),
])
def test_kernel_group(name, cols, tiny, gem):
    fmt = parse_format(name)
    assert packing.kernel_group(fmt, cols, packing.TINYGEMM_GROUPS) == tiny
    assert packing.kernel_group(fmt, cols, None) == gem


@pytest.mark.parametrize("name", ["int4-g128", "int4-g32", "int4", "int4-sym-g64", "int4-tensor"])
def test_tinygemm_operands_reproduce_mixq_exactly(name):
    fmt, q = _solved(name)
    ops = packing.tinygemm_operands(fmt, q)
    assert ops.codes.min() >= 0 and ops.codes.max() <= 15
    w = fmt.dequantize(q)
    s = ops.scale.repeat_interleave(ops.group, dim=1)
    z = ops.zero.repeat_interleave(ops.group, dim=1)
    assert torch.equal((ops.codes - 8).float() * s + z, w)  # (c - z) s = c s - z s: both products exact
    assert torch.equal(packing.tinygemm_dequantize(ops, torch.float32), w)


def test_tinygemm_operands_fmin_within_one_ulp():
    fmt, q = _solved("int4-fmin-g32")
    ops = packing.tinygemm_operands(fmt, q)
    w = fmt.dequantize(q)
    got = packing.tinygemm_dequantize(ops, torch.float32)
    ulp = torch.finfo(torch.float32).eps * w.abs().clamp(min=ops.scale.min())
    assert ((got - w).abs() <= ulp).all()


def test_tinygemm_rejects_what_it_cannot_hold():
    fmt, q = _solved("int3-g32")
    with pytest.raises(ValueError, match="4-bit"):
        packing.tinygemm_operands(fmt, q)
    fmt, q = _solved("int4-g48")
    with pytest.raises(ValueError, match="group size"):
        packing.tinygemm_operands(fmt, q)


def test_tinygemm_nibbles_and_scale_layout():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 9, 8]], dtype=torch.int32)
    assert packing.tinygemm_nibbles(codes).tolist() == [[0x12, 0x34], [0xF0, 0x98]]
    ops = packing.TinyGemmOperands(codes, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]]), 2)
    sz = packing.tinygemm_scale_and_zero(ops, torch.float32)
    assert sz.shape == (2, 2, 2)  # [groups, rows, (scale, zero)]
    assert sz[1, 0].tolist() == [2.0, 6.0] and sz[0, 1].tolist() == [3.0, 7.0]


@pytest.mark.parametrize("name", ["int4-g128", "int4-sym-g64", "int4", "int4-fmin-g32"])
def test_tinygemm_module_on_cpu_matches_fake_quant(name):
    """PyTorch's CPU tinygemm (same scale/zero convention, its own layout) runs the module."""
    fmt, q = _solved(name, rows=32, cols=512)
    bias = torch.randn(32)
    ops = packing.tinygemm_operands(fmt, q)
    m = TinyGemmLinear(ops, bias, dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(5, 3, 512)
    ref = x @ fmt.dequantize(q).T + bias
    y = m(x)
    assert y.shape == (5, 3, 32)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-5 * float(x.abs().sum(-1).max()))
    # bfloat16: the kernel rounds scale and zero to bf16 (tinygemm's documented precision)
    mb = TinyGemmLinear(ops, bias, dtype=torch.bfloat16, device=torch.device("cpu"))
    xb = x.to(torch.bfloat16)
    wk = packing.tinygemm_dequantize(ops, torch.bfloat16).float()
    yb = mb(xb).float()
    refk = xb.float() @ wk.T + bias.to(torch.bfloat16).float()
    scale = (xb.float().abs() @ wk.abs().T).max()
    assert (yb - refk).abs().max() <= 2**-7 * scale
    w_err = (wk - fmt.dequantize(q)).abs()  # kernel weights vs mixq's: within the bf16 rounding of s and z
    s = ops.scale.repeat_interleave(ops.group, 1)
    z = ops.zero.repeat_interleave(ops.group, 1)
    bound = 2**-8 * (8 * s + z.abs()) + 2**-8 * fmt.dequantize(q).abs() + 1e-12
    assert (w_err <= bound).all()
    assert w_err.max() > 0  # bf16 does round: the bound is not vacuous


@pytest.mark.parametrize("name", ["int8", "int8-sym", "int4-g128", "int4-sym-g32", "int2-g64", "int8-g64", "int4"])
def test_gemlite_operands_reproduce_mixq(name):
    fmt, q = _solved(name)
    ops = packing.gemlite_operands(fmt, q)
    assert ops.codes.dtype == torch.uint8 and int(ops.codes.max()) < 2**fmt.bits
    assert torch.equal(ops.zero, ops.zero.round())  # integer zero points
    w = fmt.dequantize(q)
    assert torch.equal(packing.gemlite_dequantize(ops, torch.float32), w)
    # in float16 every step of gemlite's (W_q - zeros) * scales is exact but the last: one rounding, as fake-quant's
    assert torch.equal(packing.gemlite_dequantize(ops, torch.float16), w.to(torch.float16))


def test_gemlite_rejects_fmin_and_odd_groups():
    for name in ("int4-fmin-g32", "int3-g32"):
        fmt, q = _solved(name)
        with pytest.raises(ValueError, match="integer zero point"):
            packing.gemlite_operands(fmt, q)
    fmt, q = _solved("int4-g48")
    with pytest.raises(ValueError, match="divisible by 32"):
        packing.gemlite_operands(fmt, q)


@pytest.mark.parametrize("name", ["int8", "int8-sym", "int8-tensor"])
def test_int8_operands_and_module(name):
    fmt, q = _solved(name, rows=16, cols=64)
    ops = packing.int8_operands(fmt, q)
    w = fmt.dequantize(q)
    assert torch.equal((ops.codes.float() - ops.zero[:, None]) * ops.scale[:, None], w)
    assert torch.equal(packing.int8_dequantize(ops, torch.float32), w)
    m = Int8WeightOnlyLinear(ops, None, dtype=torch.float32, device=torch.device("cpu"))
    x = torch.randn(4, 64)
    torch.testing.assert_close(m(x), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-channel"):
        packing.int8_operands(*_solved("int8-g32", rows=16, cols=64))
