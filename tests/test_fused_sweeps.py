"""The fused Triton column sweeps against the PyTorch loops they replace.

Runs on CUDA, or on a CPU with Triton installed and ``TRITON_INTERPRET=1`` (Triton's
interpreter); skipped elsewhere.  Results agree to float rounding (the kernel may fuse
multiply-adds), so codes may differ where a value sits on a rounding boundary: the test
asks for near-total agreement of codes and of the layer objective.
"""

from __future__ import annotations

import os

import pytest
import torch

from mixq.formats import parse_format
from mixq.solvers import kernels
from mixq.solvers.gptq import GPTQOptions, solve_gptq
from mixq.solvers.quantease import QuantEaseOptions, solve_gptq_quantease, solve_quantease

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(not kernels.available(parse_format("int4"), DEVICE),
                                  reason="needs CUDA, or Triton with TRITON_INTERPRET=1")


def _layer(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(cols, generator=g))  # uneven column scales
    return w.to(DEVICE), (x.T @ x / len(x)).to(DEVICE)


def _both(solve, w, gram, fmt, options, monkeypatch):  # type: ignore[no-untyped-def]
    fused = solve(w, fmt, gram, options)
    monkeypatch.setenv("MIXQ_FUSED_SWEEPS", "0")
    eager = solve(w, fmt, gram, options)
    monkeypatch.delenv("MIXQ_FUSED_SWEEPS")
    return fused, eager


def _agree(fused, eager) -> None:  # type: ignore[no-untyped-def]
    same = (fused.qtensor.codes == eager.qtensor.codes).float().mean().item()
    assert same > 0.995, f"codes agree on only {same:.4f}"
    assert fused.loss == pytest.approx(eager.loss, rel=2e-3)
    for k, v in eager.qtensor.params.items():
        assert torch.allclose(fused.qtensor.params[k], v, rtol=1e-3, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("spec,options", [
    ("int4", GPTQOptions()),
    ("int3-g32", GPTQOptions()),
    ("int4-g64", GPTQOptions(block_size=32)),  # groups longer than blocks
    ("int3-g32", GPTQOptions(act_order=True)),
    ("int4-sym-g32", GPTQOptions(static_groups=True)),
    ("int4-fmin-g32", GPTQOptions()),
    ("int4-tensor", GPTQOptions()),
    ("int4-g32", GPTQOptions(keep_columns=0.05)),
    ("int3-g32", GPTQOptions(outliers=0.02)),
    ("int3-g32", GPTQOptions(outliers=0.02, act_order=True)),
])
def test_fused_gptq_matches_the_loop(spec, options, monkeypatch):
    w, gram = _layer(24, 96, seed=len(spec))
    _agree(*_both(solve_gptq, w, gram, parse_format(spec), options, monkeypatch))


@needs_kernels
@pytest.mark.parametrize("spec,solve,options", [
    ("int3-g32", solve_quantease, QuantEaseOptions(iterations=4)),
    ("int4", solve_quantease, QuantEaseOptions(iterations=4, block_size=32)),
    ("int3-g32", solve_gptq_quantease, QuantEaseOptions(iterations=3)),
    ("int3-g32", solve_quantease, QuantEaseOptions(iterations=3, outliers=0.02)),
])
def test_fused_quantease_matches_the_loop(spec, solve, options, monkeypatch):
    w, gram = _layer(24, 96, seed=7)
    _agree(*_both(solve, w, gram, parse_format(spec), options, monkeypatch))


def test_a_format_without_a_kernel_takes_the_loop():
    assert not kernels.available(parse_format("nf4-g64"), DEVICE)
    assert not kernels.available(parse_format("mxint8"), DEVICE)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not kernels.available(parse_format("int4"), torch.device("cpu"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only under Triton's interpreter (CI's CPU run)")
def test_the_interpreter_runs_the_kernels():
    """CI runs this module with TRITON_INTERPRET=1: the kernels must then be there, not skipped unseen."""
    assert kernels.available(parse_format("int4"), torch.device("cpu")), "TRITON_INTERPRET=1 but Triton is not installed"
