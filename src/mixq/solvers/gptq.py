"""GPTQ (Frantar et al. 2022) for any format: columns are quantized one at a time and
the error of each is spread over the not-yet-quantized columns through the inverse
Hessian's Cholesky factor, in blocks with lazy updates (as IST-DASLab/gptq).

Differences from the reference, on purpose:
* group parameters are fitted on the *updated* columns of a group when the group starts
  (blocks are aligned to groups so those columns are current; the reference fits on a
  stale copy when a group starts inside a block);
* act-order with groups keeps the stored groups contiguous by fitting them up front
  (static groups), so the result is an ordinary per-group checkpoint;
* a Gram matrix that Cholesky rejects is damped ten times harder, up to three times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.errors import MixqError, PlanError
from mixq.formats import Format
from mixq.solvers import kernels
from mixq.solvers.grid import ColumnGrid
from mixq.solvers.outliers import check_fraction, column_outlier_bits, outlier_bits, salient_mask
from mixq.solvers.registry import SolveResult, register_solver
from mixq.solvers.rtn import layer_loss


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # fraction of the mean diagonal added to the Gram's diagonal
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = False  # quantize columns in order of decreasing Gram diagonal
    static_groups: bool = False  # fit every group on the original weight before solving
    keep_columns: float = 0.0  # LLM.int8()-style: fraction of input columns (largest input RMS) kept in 16 bits
    outliers: float = 0.0  # fraction of weights (of columns, if structured) kept in 16 bits, the rest solved
    structured: bool = False  # outliers as whole columns

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise PlanError(f"gptq: damp must be in [0, 1), got {self.damp}")
        if self.block_size < 1:
            raise PlanError(f"gptq: block_size must be positive, got {self.block_size}")
        if not 0 <= self.keep_columns < 1:
            raise PlanError(f"gptq: keep_columns must be a fraction in [0, 1), got {self.keep_columns}")
        check_fraction("gptq", self.outliers)
        if self.outliers and self.keep_columns:
            raise PlanError("gptq: choose outliers or keep_columns, not both")


def _gptq_extra_bits(options: GPTQOptions, shape: tuple[int, int]) -> int:
    return (column_outlier_bits(shape[0], round(options.keep_columns * shape[1]))
            + outlier_bits(options.outliers, options.structured, shape))


def inverse_cholesky(gram: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, damping harder if needed."""
    n = gram.shape[0]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    base = float(torch.diag(gram).mean())
    for attempt in range(4):
        h = gram + (damp * 10**attempt) * base * eye
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise MixqError(f"the Gram matrix is not positive definite even with damping {damp * 1000:g} (x mean diagonal)")


def aligned_blocks(cols: int, group: int, block_size: int) -> list[tuple[int, int]]:
    """Blocks of about ``block_size`` columns that never cut a group: groups no wider than a block
    pack whole into blocks of ``block_size // group`` groups; a wider group is cut into the fewest
    equal blocks that fit, so that each group starts on a block edge."""
    if group <= block_size:
        edges = list(range(0, cols, (block_size // group) * group))
    else:
        k = math.ceil(group / block_size)
        while group % k:
            k += 1
        edges = sorted(set(range(0, cols, group // k)) | set(range(0, cols, group)))
    return [(a, b) for a, b in zip(edges, edges[1:] + [cols])]


def group_spans(a: int, b: int, width: int, static: bool) -> list[tuple[int, int]]:
    """The column ranges of block ``[a, b)`` between group starts (one range when the groups are
    fitted before the sweep): each group's grid is fitted on the weights as they are when the
    sweep reaches it, after the errors of the columns before it in the block."""
    starts = [a] if static else sorted({a, *range(-(-a // width) * width, b, width)})
    return list(zip(starts, starts[1:] + [b]))


def prepare(weight: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    """float32 copies with dead inputs (zero diagonal) neutralised, as the reference does."""
    w = weight.detach().float().clone()
    h = gram.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


@register_solver("gptq", GPTQOptions, needs_calibration=True, extra_bits=_gptq_extra_bits)
def solve_gptq(weight: Tensor, fmt: Format, gram: Tensor | None, options: GPTQOptions) -> SolveResult:
    if gram is None:
        raise PlanError("gptq needs a Gram matrix (calibration data)")
    w, h = prepare(weight, gram)
    rows, cols = w.shape
    # weights kept in 16 bits: the loudest input columns (keep_columns) or the most salient
    # weights (outliers); they take GPTQ's running value (error 0) and stay out of the grids' fits
    n_keep = round(options.keep_columns * cols)
    keep = None
    if n_keep:
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[:, torch.topk(torch.diag(gram.float()), n_keep).indices] = True
    elif options.outliers:
        keep = salient_mask(w, h, options.outliers, options.structured)
    grid = ColumnGrid.of(fmt, cols)
    static = options.static_groups or options.act_order or fmt.per_tensor or grid.width == cols
    if static:
        grid.fit_all(w if keep is None else w.masked_fill(keep, 0))
        blocks = [(a, min(a + options.block_size, cols)) for a in range(0, cols, options.block_size)]
    else:
        blocks = aligned_blocks(cols, grid.width, options.block_size)
    perm = torch.argsort(torch.diag(h), descending=True) if options.act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    keep_p = None if keep is None else keep[:, perm].contiguous()
    hinv = inverse_cholesky(h, options.damp)
    q = torch.zeros_like(w)
    order = perm.tolist()
    if kernels.available(fmt, w.device):
        _fused_columns(w, hinv, q, grid, blocks, static, order, keep_p)
    else:
        _eager_columns(w, hinv, q, grid, blocks, static, order, keep_p)
    q = q[:, torch.argsort(perm)]
    qt = grid.qtensor(q)
    w_hat = fmt.dequantize(qt)
    outliers = None
    if keep is not None:
        outliers = torch.where(keep, q - w_hat, torch.zeros_like(w_hat))
        w_hat = w_hat + outliers
    return SolveResult(qt, w_hat, layer_loss(weight, w_hat, gram), outliers)


def _fit_group(grid: ColumnGrid, col: int, w: Tensor, keep: Tensor | None) -> int:
    """Fit the group starting at ``col`` on ``w`` (its columns from ``col``, current); returns the group."""
    g = grid.group_of(col)
    end = grid.span(g)[1]
    src = w[:, col:end]
    grid.fit(g, src if keep is None else src.masked_fill(keep[:, col:end], 0))
    return g


def _eager_columns(w: Tensor, hinv: Tensor, q: Tensor, grid: ColumnGrid, blocks: list[tuple[int, int]], static: bool,
                   order: list[int], keep: Tensor | None) -> None:
    """The column loop in PyTorch: ``q`` receives the solved columns (``w`` is consumed);
    entries where ``keep`` is set keep their running value.  Within a block, the columns of one
    group span are swept with rank-one updates; a span's errors reach the rest of its block in
    one product, the block's errors the columns after it in another (the lazy batch updates)."""
    for a, b in blocks:
        err = torch.zeros_like(w[:, a:b])
        for s0, s1 in group_spans(a, b, grid.width, static):
            if not static and s0 % grid.width == 0:
                _fit_group(grid, s0, w, keep)
            for j in range(s0, s1):
                col = order[j]
                wj = w[:, j]
                qj = grid.round(col, wj)
                if keep is not None:
                    qj = torch.where(keep[:, j], wj, qj)
                q[:, j] = qj
                e = (wj - qj) / hinv[j, j]
                w[:, j:s1].sub_(e.unsqueeze(1) * hinv[j, j:s1].unsqueeze(0))
                err[:, j - a] = e
            if s1 < b:
                w[:, s1:b].sub_(err[:, s0 - a : s1 - a] @ hinv[s0:s1, s1:b])
        if b < w.shape[1]:
            w[:, b:].sub_(err @ hinv[a:b, b:])


def _fused_columns(w: Tensor, hinv: Tensor, q: Tensor, grid: ColumnGrid, blocks: list[tuple[int, int]], static: bool,
                   order: list[int], keep: Tensor | None) -> None:
    """The same loop with one fused kernel launch per group span (``kernels``)."""
    rows, cols = w.shape
    hinv = hinv.contiguous()  # LAPACK's factor may come column-major
    fused = kernels.FusedGrid.of(grid, rows, order, w.device)  # static: every group fitted already
    keep8 = torch.zeros(1, cols, dtype=torch.int8, device=w.device) if keep is None else keep.to(torch.int8)
    err = torch.empty(rows, max(b - a for a, b in blocks), dtype=w.dtype, device=w.device)
    for a, b in blocks:
        e = err[:, : b - a]
        for s0, s1 in group_spans(a, b, grid.width, static):
            if not static and s0 % grid.width == 0:
                g = _fit_group(grid, s0, w, keep)
                fused.set(g, grid.params[g])  # type: ignore[arg-type]
            kernels.sweep_block(0, w[:, s0:s1], q[:, s0:s1], e[:, s0 - a : s1 - a], hinv[s0:s1, s0:], fused, keep8, s0)
            if s1 < b:
                w[:, s1:b].sub_(e[:, s0 - a : s1 - a] @ hinv[s0:s1, s1:b])
        if b < cols:
            w[:, b:].sub_(e @ hinv[a:b, b:])
