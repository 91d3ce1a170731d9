"""Fixed point (fxpW-fF) by hand-computed values, exact sizes, and through every solver."""

from __future__ import annotations

import pytest
import torch

from mixq.errors import FormatError
from mixq.formats import FixedPointFormat, parse_format
from mixq.plan import Plan
from mixq.quantize import quantize_
from mixq.solvers import get_solver, solver_names


def test_hand_values_fxp8_f5():
    """value = code / 32, codes -128..127: range [-4, 3.96875]."""
    fmt = parse_format("fxp8-f5")
    x = torch.tensor([[0.1, -0.1, 1.0, 3.96875, 3.99, 5.0, -4.0, -4.2, -100.0, 0.0]])
    q = fmt.quantize(x)
    assert q.params == {}
    assert q.codes.dtype == torch.int8
    assert q.codes[0].tolist() == [3, -3, 32, 127, 127, 127, -128, -128, -128, 0]  # round(0.1 * 32) = round(3.2)
    assert fmt.dequantize(q)[0, :2].tolist() == [0.09375, -0.09375]


def test_ties_go_to_the_even_code():
    fmt = parse_format("fxp8-f5")
    halves = torch.tensor([[1, 3, 5, -1, -3, 255, -255, 253]]) / 64  # odd multiples of half a step
    assert fmt.quantize(halves).codes[0].tolist() == [0, 2, 2, 0, -2, 127, -128, 126]  # 255/2 saturates at 127


@pytest.mark.parametrize("name,lo,hi", [("fxp8-f0", -128.0, 127.0), ("fxp4-f4", -0.5, 0.4375),
                                        ("fxp2-f1", -1.0, 0.5), ("fxp16-f12", -8.0, 8 - 2.0**-12)])
def test_range(name, lo, hi):
    fmt = parse_format(name)
    w = torch.tensor([[-1e4, 1e4, lo, hi]])
    assert fmt.fake_quantize(w)[0].tolist() == [lo, hi, lo, hi]


def test_sixteen_bits_exact_and_stored_in_int16():
    fmt = parse_format("fxp16-f12")
    w = torch.randint(-(2**15), 2**15, (4, 64)).float() / 2**12  # on the grid already
    q = fmt.quantize(w)
    assert q.codes.dtype == torch.int16
    assert torch.equal(fmt.dequantize(q), w)


def test_sizes_are_exact():
    assert parse_format("fxp8-f5").storage_bits((96, 64)) == 96 * 64 * 8
    assert parse_format("fxp3-f2").bits_per_weight((5, 7)) == 3.0
    assert FixedPointFormat(8, 5).group_overhead_bits == 0 and FixedPointFormat(8, 5).per_tensor


def test_bad_fraction_widths():
    with pytest.raises(FormatError, match="fraction width 9 exceeds the width 8"):
        parse_format("fxp8-f9")
    with pytest.raises(FormatError, match="must not be negative"):
        FixedPointFormat(8, -1)
    with pytest.raises(FormatError, match="give the fraction width"):
        parse_format("fxp8")


def _layer(seed: int, rows: int = 24, cols: int = 64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.5
    x = torch.randn(512, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return w, x.T @ x / len(x)


@pytest.mark.parametrize("solver", solver_names())
def test_every_solver_writes_fixed_point_values(solver):
    fmt = parse_format("fxp4-f2")  # steps of 0.25 in [-2, 1.75]
    w, gram = _layer(0)
    s = get_solver(solver)
    r = s(w, fmt, gram, s.options({"iterations": 4} if "quantease" in solver else {}))
    assert torch.equal(fmt.dequantize(r.qtensor), r.weight)
    codes = r.weight * 4
    assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7
    rtn = get_solver("rtn")(w, fmt, gram, get_solver("rtn").options({}))
    assert r.loss <= rtn.loss * (1 + 1e-6)  # on this correlated layer every solver does at least as well as RTN


def test_plan_size_and_calibrated_quantize(model):
    plan = Plan.uniform("fxp8-f5", "gptq")
    rep = plan.size_report(model)
    # per block: q and o 64x64, k and v 32x64, gate, up 96x64 and down 64x96; two blocks
    assert rep.layers == 14 and rep.quantized_weights == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64)
    assert rep.quantized_bits == 8 * rep.quantized_weights
    assert plan.bits(model) == 8.0
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in plan.resolve(model)}
    out = quantize_(model, plan, calibration=torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)))
    for name, w0 in originals.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(w * 32, (w * 32).round()) and w.abs().max() <= 4
        assert not torch.equal(w, w0)
    assert len(out.layers) == 14
