"""Fused column sweeps for GPTQ and QuantEase on integer grids (Triton, CUDA).

Both solvers walk the columns of a block one at a time: round column i on its group's
grid, then spread the change over the block's later columns with a rank-1 update.  Rows
are independent, so one Triton program holds a tile of rows × the whole block in
registers and runs the column loop in place: one launch per block instead of a dozen
small kernels per column (the eager loop is launch-bound: ~150,000 columns per GPTQ pass
over SmolLM2-135M, 30 times that for QuantEase).  No library ships this (GPTQ and
QuantEase codes use per-column PyTorch loops), hence our own kernel.

The kernels cover the integer schemes ``asym``, ``sym`` and ``fmin`` (per tensor, per
channel, per group); every other format takes the eager path.  Rounding is
round-half-to-even as ``torch.round``, divisions are IEEE-rounded and multiplies are not
fused into adds, so each column step rounds as the eager loop's PyTorch operations do
(GPTQ's results agree bit for bit in our checks; QuantEase's ``addr`` may round differently).
``MIXQ_FUSED_SWEEPS=0`` turns the kernels off (for comparisons).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mixq.formats import Format
from mixq.solvers.grid import ColumnGrid

SCHEME_IDS = {"asym": 0, "sym": 1, "fmin": 2}
BLOCK_ROWS = 8  # rows per program: one warp holds the tile, so the per-column reductions stay in the warp


@functools.cache
def _triton() -> Any:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return None
    from mixq.solvers import _triton_sweeps  # Triton resolves a kernel's callees among its module's globals

    return _triton_sweeps.sweep_block


def available(fmt: Format, device: torch.device) -> bool:
    """Whether the fused sweeps serve ``fmt`` on ``device``."""
    from mixq.formats.integer import IntFormat

    if os.environ.get("MIXQ_FUSED_SWEEPS", "1") == "0":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        return False
    return isinstance(fmt, IntFormat) and fmt.scheme in SCHEME_IDS and _triton() is not None


class FusedGrid:
    """A format's integer grid as the kernel reads it: scale and zero point (or minimum) as
    [rows, groups] tensors, and each column's group."""

    def __init__(self, fmt: Format, rows: int, groups: int, group_of: Tensor, device: torch.device) -> None:
        self.fmt = fmt
        self.scheme = SCHEME_IDS[fmt.scheme]  # type: ignore[attr-defined]
        bits = fmt.bits  # type: ignore[attr-defined]
        half = 2 ** (bits - 1)
        self.lo, self.hi = {0: (-half, half - 1), 1: (-(half - 1), half - 1), 2: (0, 2**bits - 1)}[self.scheme]
        n = 1 if fmt.per_tensor else rows
        self.scale = torch.ones(n, groups, dtype=torch.float32, device=device)
        self.zero = torch.zeros(n, groups, dtype=torch.float32, device=device)
        self.group_of = group_of.to(device=device, dtype=torch.int32).contiguous()

    def set(self, group: int, params: dict[str, Tensor]) -> None:
        self.scale[:, group] = params["scale"].reshape(-1)
        if self.scheme == 0:
            self.zero[:, group] = params["zero"].reshape(-1)
        elif self.scheme == 2:
            self.zero[:, group] = params["min"].reshape(-1)

    @classmethod
    def of(cls, grid: ColumnGrid, rows: int, order: Iterable[int], device: torch.device) -> FusedGrid:
        """The kernel's view of ``grid`` for columns taken in ``order``, with the groups
        fitted so far (the others are set as they are fitted)."""
        fused = cls(grid.fmt, rows, len(grid.params), torch.tensor([grid.group_of(c) for c in order]), device)
        for g, p in enumerate(grid.params):
            if p is not None:
                fused.set(g, p)
        return fused

    @property
    def row_stride(self) -> int:
        return 0 if self.scale.shape[0] == 1 else self.scale.stride(0)


def sweep_block(mode: int, x: Tensor, wh: Tensor, d: Tensor, s: Tensor, grid: FusedGrid, keep: Tensor, a: int,
                quantize: bool = True) -> None:
    """Run the kernel on columns ``a:a+ncols`` (``x``, ``wh``, ``d`` and ``s`` are views
    starting at that block: [rows, ncols] and [ncols, ≥ncols]; ``keep``: int8 [rows or 1,
    cols], entries that keep their running value)."""
    import triton

    kernel = _triton()
    rows, ncols = x.shape
    bc = max(16, triton.next_power_of_2(ncols))
    for t in (x, wh, d, s):
        assert t.stride(1) == 1, "the kernel needs row-major blocks"
    kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        x, x.stride(0), wh, wh.stride(0), d, d.stride(0), s, s.stride(0), grid.scale, grid.zero, grid.row_stride,
        grid.scale.stride(1), grid.group_of, keep, 0 if keep.shape[0] == 1 else keep.stride(0), a, ncols, rows,
        MODE=mode, SCHEME=grid.scheme, QUANT=quantize, LO=float(grid.lo), HI=float(grid.hi), BR=BLOCK_ROWS, BC=bc,
        num_warps=1,
        enable_fp_fusion=False)  # separate multiply and add, as the eager loop rounds them
