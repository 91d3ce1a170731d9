"""k-quants (q2-k ... q6-k): ggml's bytes, the gguf reference dequantiser, ggml's reference
quantizer, exact sizes, and the column-wise solvers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mixq.errors import FormatError  # noqa: E402
from mixq.formats import parse_format  # noqa: E402
from mixq.formats.kquant import KQuantFormat  # noqa: E402
from mixq.solvers import get_solver  # noqa: E402
from mixq.solvers.grid import ColumnGrid  # noqa: E402
from mixq.solvers.rtn import layer_loss  # noqa: E402

BITS = [2, 3, 4, 5, 6]
#: exact bits per weight of GGUF's types (sizeof(block_qB_K) * 8 / 256)
BPW = {2: 2.625, 3: 3.4375, 4: 4.5, 5: 5.5, 6: 6.5625}


def qtype(fmt: KQuantFormat):
    return gguf.GGMLQuantizationType[fmt.ggml_type]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (tells -0.0 from 0.0)."""
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


def ggml_input() -> np.ndarray:
    """Varied super-blocks: small Gaussian, heavy tails, all positive, all negative, an all-zero
    block, a zero sub-block, a constant block and a sub-block far below the others."""
    rs = np.random.RandomState(1234)
    x = np.concatenate([rs.standard_normal(8 * 256) * 0.02, rs.standard_normal(4 * 256) ** 3,
                        rs.uniform(0, 1, 4 * 256), rs.uniform(-1, 0, 2 * 256)]).astype(np.float32)
    x[:256] = 0
    x[256:272] = 0
    x[512:768] = 0.25
    x[768:800] *= np.float32(1e-4)
    return x


#: SHA-256 of ggml's quantize_row_qB_K_ref(ggml_input()) bytes: ggml-quants.c of llama.cpp 0c1e570
#: (the copy inside llama-cpp-python 0.3.36) compiled with gcc 12 -O2 -std=c11 on x86-64
GGML_REF_SHA256 = {
    2: "7a42e6550240b4c11bb1371c31a668da277c7f4f9e24043b72746f39ecc8293f",
    3: "7b063000ad2c9c2b652d27f67d3401da83b34b157191cfeb5ed4265a9a00139e",
    4: "527263c5695e090bc2826cbb20c749080f9564c1f784bdb113b839577d3aa6a8",
    5: "aeda68354941168bba29436cd493605e8bc6e84c83a2564885319ee4a4edd47d",
    6: "038ba0ddc41813c93e8d3f1eef0855cdc5df986ee59003d88b490cf6c889a5df",
}


@pytest.mark.parametrize("bits", BITS)
def test_names_and_exact_size(bits):
    fmt = parse_format(f"q{bits}-k")
    assert isinstance(fmt, KQuantFormat) and fmt.name == f"q{bits}-k" and parse_format(fmt.name) == fmt
    assert fmt.bits_per_weight((4, 512)) == BPW[bits]
    block, size = gguf.GGML_QUANT_SIZES[qtype(fmt)]
    assert (block, size) == (256, fmt.layout.block_bytes)
    assert fmt.storage_bits((3, 768)) == 3 * 3 * size * 8


@pytest.mark.parametrize("bad", ["q7-k", "q1-k", "q4", "q4-k-g32", "q4-0"])
def test_bad_names(bad):
    with pytest.raises(FormatError):
        parse_format(bad)


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(FormatError, match="multiple of 256"):
        parse_format("q4-k").quantize(torch.randn(4, 576))


@pytest.mark.parametrize("bits", BITS)
def test_quantizer_reproduces_ggml_reference_bytes(bits):
    """Our port of quantize_row_qB_K_ref writes ggml's bytes, bit for bit."""
    fmt = parse_format(f"q{bits}-k")
    q = fmt.quantize(torch.from_numpy(ggml_input()).reshape(6, 768))
    data = fmt.to_ggml(q)
    assert data.shape == (6, 3 * fmt.layout.block_bytes)
    assert hashlib.sha256(data.tobytes()).hexdigest() == GGML_REF_SHA256[bits]


@pytest.mark.parametrize("bits", BITS)
def test_decode_matches_gguf_dequantize_on_our_bytes(bits):
    fmt = parse_format(f"q{bits}-k")
    w = torch.from_numpy(ggml_input()).reshape(9, 512)
    q = fmt.quantize(w)
    data = fmt.to_ggml(q)
    ref = gguf.quants.dequantize(data, qtype(fmt))
    assert same_bits(fmt.dequantize(q).numpy(), ref)
    back = fmt.from_ggml(data, (9, 512))
    assert torch.equal(back.codes, q.codes) and back.params.keys() == q.params.keys()
    assert all(torch.equal(back.params[k], q.params[k]) for k in q.params)
    # codes are signed as the integer formats' and every level is used on this data
    half = 2 ** (bits - 1)
    assert int(q.codes.min()) == -half and int(q.codes.max()) == half - 1


@pytest.mark.parametrize("bits", BITS)
def test_decode_matches_gguf_dequantize_on_random_bytes(bits):
    """Any bytes (finite fp16 super-block scales): from_ggml + decode = gguf's dequantiser, and
    to_ggml gives the same bytes back."""
    fmt = parse_format(f"q{bits}-k")
    rs = np.random.RandomState(bits)
    data = rs.randint(0, 256, size=(4, 2 * fmt.layout.block_bytes)).astype(np.uint8)
    blocks = data.reshape(8, fmt.layout.block_bytes)
    offsets = {2: [80, 82], 3: [108], 4: [0, 2], 5: [0, 2], 6: [208]}[bits]  # d (and dmin) in the block
    for off in offsets:
        blocks[:, off : off + 2] = (rs.standard_normal(8) * 0.01).astype(np.float16).view(np.uint8).reshape(8, 2)
    q = fmt.from_ggml(data, (4, 512))
    assert same_bits(fmt.dequantize(q).numpy(), gguf.quants.dequantize(data, qtype(fmt)))
    assert np.array_equal(fmt.to_ggml(q), data)


@pytest.mark.parametrize("bits", BITS)
def test_column_grid_rounds_on_the_fitted_super_block(bits):
    """ColumnGrid fits each super-block once and rounds column by column on its sub-block's
    scale: the same weights as quantize/dequantize."""
    fmt = parse_format(f"q{bits}-k")
    w = torch.randn(8, 512) * 0.05
    grid = ColumnGrid.of(fmt, 512)
    grid.fit_all(w)
    cols = torch.stack([grid.round(c, w[:, c]) for c in range(512)], dim=1)
    expected = fmt.fake_quantize(w)
    assert torch.equal(cols, expected) and torch.equal(grid.round_all(w), expected)


@pytest.mark.parametrize(("solver", "bits", "options"), [("gptq", 3, {}), ("gptq", 4, {}), ("gptq", 6, {}),
                                                         ("quantease", 4, {"iterations": 4})])
def test_calibrated_solvers_with_kquants(solver, bits, options):
    """Two super-blocks per row, so GPTQ fits the second on columns the first has updated."""
    torch.manual_seed(bits)
    w = torch.randn(8, 512)
    a = torch.randn(512, 1024)
    gram = a @ a.T / 1024 + 0.1 * torch.eye(512)  # a random SPD Gram
    fmt = parse_format(f"q{bits}-k")
    s = get_solver(solver)
    out = s(w, fmt, gram, s.options(options))
    assert torch.equal(out.weight, fmt.dequantize(out.qtensor))  # the codes are the solved weight
    half = 2 ** (bits - 1)
    assert int(out.qtensor.codes.min()) >= -half and int(out.qtensor.codes.max()) <= half - 1
    rtn = layer_loss(w, fmt.fake_quantize(w), gram)
    assert out.loss < 0.95 * rtn
    data = fmt.to_ggml(out.qtensor)  # and GGUF holds them as they are
    assert same_bits(gguf.quants.dequantize(data, qtype(fmt)), out.weight.numpy())


def test_sqrt_is_correctly_rounded():
    """Q4_K/Q5_K weight sub-blocks by sqrtf(Σx²/32): one ulp off (PyTorch's float32 sqrt on CPU
    here) changed a block of SmolLM2's ffn_down against llama.cpp's bytes."""
    from mixq.formats.kquant import _sqrt

    v = np.float32(1.1346492767333984) / np.float32(32)
    assert _sqrt(torch.tensor([v])).item() == float(np.sqrt(v)) == float(np.float32(0.188302383))
    x = np.random.RandomState(0).uniform(0, 4, 100_000).astype(np.float32)
    assert np.array_equal(_sqrt(torch.from_numpy(x)).numpy(), np.sqrt(x))
