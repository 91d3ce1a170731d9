"""Code-book rounding against independent implementations.

Minifloat and OCP MX element grids against ml_dtypes' and torch's float8 / float6 / float4
types: the same finite values, and the same round-to-nearest-even (with saturation: the
oracle's input is clipped to +-max first, as mixq saturates) on dense sweeps that hold every
midpoint between neighbours, the float32 values next to it, and values out of range.
Every code book (log, NF, denormalised and biased minifloats too) against a brute-force
nearest-value search whose ties go to the even rank, on sweeps with exact ties.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixq.formats import parse_format
from mixq.formats.codebook import CodebookFormat

ML_DTYPES = {"fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2,
             "fp6-e3m2": ml_dtypes.float6_e3m2fn, "fp6-e2m3": ml_dtypes.float6_e2m3fn,
             "fp4-e2m1": ml_dtypes.float4_e2m1fn}
TORCH_DTYPES = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}
MX = {"mxfp4": "fp4-e2m1", "mxfp6-e3m2": "fp6-e3m2", "mxfp6-e2m3": "fp6-e2m3", "mxfp8-e4m3": "fp8-e4m3",
      "mxfp8-e5m2": "fp8-e5m2"}
CODEBOOKS = ["fp8-e4m3", "fp8-e5m2", "fp6-e3m2", "fp6-e2m3", "fp4-e2m1", "fp8-e4m3-dn", "fp4-e2m1-dn",
             "fp5-e2m2-bias2-g16", "fp4-e3m0", "bmf8-e4m3-bias3-dn-g16", "log4", "log3-g32", "log8-raw",
             "nf4-g64", "nf3", "nf2-g64", "mxfp4", "mxfp6-e2m3", "blog4-g16"]
INF = torch.tensor(math.inf)


def _oracle_values(dtype: type, bits: int) -> list[float]:
    v = np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)
    return sorted(set(v[np.isfinite(v)].tolist()))


def _sweep(values: tuple[float, ...], seed: int = 0) -> torch.Tensor:
    """Grid values, every midpoint and the float32 values either side of both, values beyond
    the range, and uniform values inside it."""
    g = torch.tensor(values, dtype=torch.float32)
    mids = ((g[1:].double() + g[:-1].double()) / 2).float()  # exact where representable
    near = torch.cat([g, mids])
    top = g.abs().max()
    out = torch.tensor([1.0001, 1.5, 2.0, 1e6]) * top
    uniform = (torch.rand(4000, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * 1.25 * top
    return torch.cat([near, near.nextafter(INF), near.nextafter(-INF), out, -out, uniform])


def _identity_params(fmt: CodebookFormat) -> dict[str, torch.Tensor]:
    """Parameters under which a code book's element grid is used as it is."""
    return {"absmax": {"scale": torch.ones(1, 1)}, "pow2": {"exp": torch.zeros(1, 1)}, "none": {}}[fmt.scaling]


def _element_round(fmt: CodebookFormat, x: torch.Tensor) -> torch.Tensor:
    return fmt.round(x.reshape(1, -1), _identity_params(fmt)).reshape(-1)


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_minifloat_values_are_the_oracles(name):
    fmt = parse_format(name)
    assert list(fmt.values()) == _oracle_values(ML_DTYPES[name], fmt.code_bits)
    assert list(parse_format(name + "-raw").values()) == list(fmt.values())


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_minifloat_rounding_is_the_oracles(name):
    fmt = parse_format(name + "-raw")
    x = _sweep(fmt.values())
    top = fmt.max_value
    expected = torch.from_numpy(np.clip(x.numpy(), -top, top).astype(ML_DTYPES[name]).astype(np.float32))
    assert torch.equal(_element_round(fmt, x), expected)
    assert torch.equal(_element_round(parse_format(name), x), expected)  # absmax formats, scale 1
    if name in TORCH_DTYPES:
        assert torch.equal(expected, x.clamp(-top, top).to(TORCH_DTYPES[name]).float())


@pytest.mark.parametrize("name", list(MX))
@pytest.mark.parametrize("shift", [-9, 0, 5])
def test_mx_blocks_are_the_oracles(name, shift):
    """Blocks of 32 led by the largest float32 below 2^(emax+1) (shared exponent emax -
    emax = 0, then ``shift`` once the block is scaled by 2^shift); the other 31 elements
    are the sweep, those above the element maximum saturating."""
    fmt = parse_format(name)
    element = ML_DTYPES[MX[name]]
    ceiling = torch.tensor(2.0 ** (fmt.emax + 1)).nextafter(torch.tensor(0.0))
    x = _sweep(fmt.values())
    x = x[x.abs() <= ceiling]
    x = torch.cat([x, torch.zeros(-len(x) % 31)]).reshape(-1, 31)
    w = torch.cat([ceiling.expand(len(x), 1), x], dim=1).reshape(1, -1) * 2.0**shift
    q = fmt.quantize(w)
    assert torch.equal(q.params["exp"], torch.full_like(q.params["exp"], shift))
    top = fmt.max_value
    elements = np.clip(w.numpy() * 2.0**-shift, -top, top).astype(element).astype(np.float32)
    assert torch.equal(fmt.dequantize(q), torch.from_numpy(elements) * 2.0**shift)


def _even_rank(values: tuple[float, ...]) -> np.ndarray:
    """Whether each value's magnitude has an even position among the magnitudes of its sign (0 first)."""
    pos = sorted({abs(v) for v in values if v >= 0})
    neg = sorted({abs(v) for v in values if v <= 0})
    return np.array([(pos if v >= 0 else neg).index(abs(v)) % 2 == 0 for v in values])


def _brute_force(values: tuple[float, ...], u: np.ndarray) -> tuple[np.ndarray, int]:
    """Nearest values (ties to the even rank) of ``u`` by comparing every distance, and the
    number of exact ties among ``u``."""
    grid = np.array(values, dtype=np.float32).astype(np.float64)  # the values codes decode to
    d = np.abs(u[:, None] - grid[None, :])
    nearest = d == d.min(axis=1, keepdims=True)
    even = nearest & _even_rank(values)[None, :]
    pick = np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1))
    return grid[pick], int((nearest.sum(axis=1) > 1).sum())


@pytest.mark.parametrize("name", CODEBOOKS)
def test_every_code_book_rounds_to_nearest_ties_to_even_rank(name):
    fmt = parse_format(name)
    values = fmt.values()
    x = _sweep(values)[: 3 * (2 * len(values) - 1)]  # grid, midpoints and their neighbours
    x = torch.cat([x, -x])
    expected, ties = _brute_force(values, x.double().numpy())
    assert _element_round(fmt, x).double().numpy().tolist() == expected.tolist()
    if not name.startswith(("nf4", "nf3")):  # their midpoints are no float32 numbers: no float32 input ties
        assert ties > 0


@pytest.mark.parametrize("name,ties", [
    ("log4", [(0.75, 0.5), (-0.75, -0.5), (0.375, 0.5), (-0.375, -0.5), (-2.0**-7, 0.0), (3 * 2.0**-7, 2.0**-5),
              (1.5, 1.0)]),
    ("nf2", [(-0.5, 0.0), (0.5, 0.43581815)]),  # -0.5: halfway -1 and 0; 0.5 is no tie
    ("fp4-e2m1-dn", [(0.125, 0.0), (0.375, 0.5), (0.75, 0.5), (1.5, 2.0)]),  # 0, 0.25, 0.5, 1, 2: even ranks 0, 0.5, 2
    ("fp4-e3m0", [(0.375, 0.5), (0.75, 0.5), (1.5, 2.0), (3.0, 2.0), (6.0, 8.0), (-12.0, -8.0)]),
])
def test_hand_written_ties(name, ties):
    """Ties by hand: the neighbour of even rank wins (log4 magnitudes 0, 2^-6, ..., 2^-1, 1
    have ranks 0..7; E3M0 magnitudes 0, 0.25, 0.5, 1, ..., 16 have ranks 0..7)."""
    fmt = parse_format(name)
    got = _element_round(fmt, torch.tensor([u for u, _ in ties]))
    assert got.tolist() == pytest.approx([v for _, v in ties], abs=1e-7)
