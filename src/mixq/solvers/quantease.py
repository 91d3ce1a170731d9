"""QuantEase (Behdin et al. 2023, arXiv 2309.01885, Algorithm 2): cyclic coordinate
descent over the columns of Ŵ on the layer objective f(Ŵ) = tr((W−Ŵ) Σ (W−Ŵ)ᵀ), with
Σ the Gram matrix of the layer's inputs, and no matrix inversion.

Fixing every column but j, f is a 1-D quadratic in column j whose minimiser is

    β_j = Ŵ_j + ((W − Ŵ) Σ)_j / Σ_jj

so the best grid point is β_j rounded on column j's (fixed) grid: each step cannot
increase f, and a sweep over all columns is monotone.  The paper's relaxed sweeps set
Ŵ_j = β_j without rounding (sweeps 1, 4, 7, ..., 25, never the last); they leave the grid
for a while and help the next quantized sweeps escape.  R = (W − Ŵ)Σ is kept current
with rank-1 updates inside blocks of columns and one matrix product per block (as
GPTQ's lazy batches).  The best quantized iterate is returned (the initial one included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.errors import PlanError
from mixq.formats import Format
from mixq.solvers import kernels
from mixq.solvers.gptq import GPTQOptions, prepare, solve_gptq
from mixq.solvers.grid import ColumnGrid
from mixq.solvers.outliers import check_fraction, hard_threshold, outlier_bits, outlier_count, salient
from mixq.solvers.registry import SolveResult, register_solver
from mixq.solvers.rtn import layer_loss, quadratic_form


@dataclass(frozen=True)
class QuantEaseOptions:
    iterations: int = 30  # sweeps over all columns
    relax: bool = True  # the paper's unquantized sweeps (1, 4, 7, ... <= 25, never the last)
    block_size: int = 128  # columns per lazy update of R
    damp: float = 0.01  # for the GPTQ initialisation of gptq+quantease
    act_order: bool = False  # for the GPTQ initialisation of gptq+quantease
    static_groups: bool = False  # for the GPTQ initialisation of gptq+quantease
    outliers: float = 0.0  # Algorithm 3: fraction of weights (or of columns, if structured) kept in 16 bits
    structured: bool = False  # outliers as whole columns

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise PlanError(f"quantease: iterations must be at least 1, got {self.iterations}")
        if self.block_size < 1:
            raise PlanError(f"quantease: block_size must be positive, got {self.block_size}")
        check_fraction("quantease", self.outliers)


def _extra_bits(options: QuantEaseOptions, shape: tuple[int, int]) -> int:
    return outlier_bits(options.outliers, options.structured, shape)


def relaxed(it: int, iterations: int) -> bool:
    """Whether sweep ``it`` (0-based) is unquantized under the paper's schedule."""
    return it % 3 == 1 and it != iterations - 1 and it <= 25


def sweep(w: Tensor, sigma_n: Tensor, grid: ColumnGrid, w_hat: Tensor, *, quantize: bool, block_size: int) -> None:
    """One pass of coordinate descent over every column of ``w_hat`` (in place).

    ``sigma_n`` is Σ with each column divided by its diagonal entry (Σ_kj / Σ_jj), so that
    R = (W − Ŵ)·sigma_n holds ((W − Ŵ)Σ)_j / Σ_jj and β_j = Ŵ_j + R_j.
    """
    rows, cols = w.shape
    r = (w - w_hat) @ sigma_n  # current at the start of the sweep
    for a in range(0, cols, block_size):
        b = min(a + block_size, cols)
        r1 = r[:, a:b].clone()
        d1 = torch.empty(rows, b - a, dtype=w.dtype, device=w.device)
        s1 = sigma_n[a:b, a:b]
        for i in range(b - a):
            j = a + i
            old = w_hat[:, j]
            beta = old + r1[:, i]
            new = grid.round(j, beta) if quantize else beta
            d = torch.sub(old, new, out=d1[:, i])  # Δ_j grows by old − new
            old.copy_(new)
            r1[:, i:].addr_(d, s1[i, i:])
        if b < cols:
            r[:, b:].addmm_(d1, sigma_n[a:b, b:])


class Sweeper:
    """Runs sweeps of ``w_hat`` towards ``target`` (both updated in place by the caller).

    On CUDA each kind of sweep (quantized, relaxed) is captured once as a CUDA graph and
    replayed: a sweep is thousands of small kernels whose launch cost dominates.
    """

    def __init__(self, target: Tensor, sigma: Tensor, grid: ColumnGrid, w_hat: Tensor, *, block_size: int,
                 graphs: bool = True) -> None:
        self.target, self.grid, self.w_hat, self.block_size = target, grid, w_hat, block_size
        self.sigma_n = (sigma / torch.diag(sigma).unsqueeze(0)).contiguous()
        self.fused = None
        if kernels.available(grid.fmt, target.device):  # one kernel launch per block of columns
            rows, cols = target.shape
            self.fused = kernels.FusedGrid.of(grid, rows, range(cols), target.device)
            self.keep = torch.zeros(1, cols, dtype=torch.int8, device=target.device)
            self.d = torch.empty(rows, min(block_size, cols), dtype=target.dtype, device=target.device)
        self.use_graphs = graphs and target.is_cuda and self.fused is None
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}

    def _fused(self, quantize: bool) -> None:
        assert self.fused is not None
        cols = self.target.shape[1]
        r = (self.target - self.w_hat) @ self.sigma_n
        for a in range(0, cols, self.block_size):
            b = min(a + self.block_size, cols)
            d = self.d[:, : b - a]
            kernels.sweep_block(1, r[:, a:b], self.w_hat[:, a:b], d, self.sigma_n[a:b, a:], self.fused, self.keep, a,
                                quantize=quantize)
            if b < cols:
                r[:, b:].addmm_(d, self.sigma_n[a:b, b:])

    def _eager(self, quantize: bool) -> None:
        sweep(self.target, self.sigma_n, self.grid, self.w_hat, quantize=quantize, block_size=self.block_size)

    def __call__(self, quantize: bool) -> None:
        if self.fused is not None:
            return self._fused(quantize)
        if not self.use_graphs:
            return self._eager(quantize)
        if quantize not in self.graphs:
            saved = self.w_hat.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._eager(quantize)  # warm-up outside the graph (allocator, library handles)
            torch.cuda.current_stream().wait_stream(stream)
            self.w_hat.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._eager(quantize)
            self.graphs[quantize] = graph
        self.graphs[quantize].replay()


def coordinate_descent(w: Tensor, sigma: Tensor, grid: ColumnGrid, w_hat: Tensor, *, iterations: int,
                       relax: bool, block_size: int, history: list[float] | None = None,
                       graphs: bool = True) -> Tensor:
    """Sweeps of QuantEase from ``w_hat`` (on ``grid``); returns the best quantized iterate.

    ``history`` (if given) receives f after every sweep (relaxed sweeps included).
    """
    w_hat = w_hat.clone()
    best, best_f = w_hat.clone(), quadratic_form(w - w_hat, sigma)
    run = Sweeper(w, sigma, grid, w_hat, block_size=block_size, graphs=graphs)
    for it in range(iterations):
        quantize = not (relax and relaxed(it, iterations))
        run(quantize)
        f = quadratic_form(w - w_hat, sigma)
        if history is not None:
            history.append(f)
        if quantize and f < best_f:
            best, best_f = w_hat.clone(), f
    return best


def outlier_aware(w: Tensor, sigma: Tensor, fmt: Format, *, start: Callable[[Tensor], tuple[Tensor, ColumnGrid]],
                  fraction: float, structured: bool, iterations: int, relax: bool, block_size: int,
                  history: list[float] | None = None, graphs: bool = True) -> tuple[Tensor, Tensor, ColumnGrid]:
    """Algorithm 3: W ≈ Q + H, Q on a grid, H sparse; returns the best (Q, H) and Q's grid.

    Each outer iteration is one coordinate-descent sweep of Q towards W − H, then one
    iterative-hard-thresholding step H ← P(H + (W − Q − H)Σ / λmax(Σ)), the projected
    gradient step of size 1/L for f, whose gradient in H is −2(W − Q − H)Σ (L = 2λmax).
    Both steps are non-increasing in f when the sweep quantizes.  H starts as the most
    salient weights (|W_ij|·√Σ_jj, or columns by Σ_jj‖W_j‖²); ``start(W − H)`` gives Q's
    first value and its grid (RTN, or GPTQ's).
    """
    keep = outlier_count(fraction, tuple(w.shape), structured)
    h = salient(w, sigma, fraction, structured)
    q, grid = start(w - h)
    q = q.clone()
    target = w - h
    run = Sweeper(target, sigma, grid, q, block_size=block_size, graphs=graphs)
    lam = float(torch.linalg.eigvalsh(sigma)[-1])
    best = (q.clone(), h.clone(), quadratic_form(w - q - h, sigma))
    for it in range(iterations):
        quantize = not (relax and relaxed(it, iterations))
        target.copy_(w - h)
        run(quantize)
        h = hard_threshold(h + (w - q - h) @ sigma / lam, keep, structured)
        f = quadratic_form(w - q - h, sigma)
        if history is not None:
            history.append(f)
        if quantize and f < best[2]:
            best = (q.clone(), h.clone(), f)
    return best[0], best[1], grid


def _start(target: Tensor, sigma: Tensor, fmt: Format, options: QuantEaseOptions, init: str) -> tuple[Tensor, ColumnGrid]:
    """The initial quantized weight and its grid: RTN, or GPTQ (whose grid is kept)."""
    grid = ColumnGrid.of(fmt, target.shape[1])
    if init == "gptq":
        g = solve_gptq(target, fmt, sigma, GPTQOptions(options.damp, options.block_size, options.act_order, options.static_groups))
        for k in range(len(grid.params)):
            grid.params[k] = {n: v if fmt.per_tensor else v[:, k : k + 1] for n, v in g.qtensor.params.items()}
        return g.weight, grid
    grid.fit_all(target)
    return grid.round_all(target), grid


def _solve(weight: Tensor, fmt: Format, gram: Tensor | None, options: QuantEaseOptions, init: str) -> SolveResult:
    if gram is None:
        raise PlanError(f"{'gptq+' if init == 'gptq' else ''}quantease needs a Gram matrix (calibration data)")
    w, sigma = prepare(weight, gram)
    h = None
    if options.outliers > 0:
        q, h, grid = outlier_aware(w, sigma, fmt, start=lambda t: _start(t, sigma, fmt, options, init),
                                   fraction=options.outliers, structured=options.structured,
                                   iterations=options.iterations, relax=options.relax, block_size=options.block_size)
    else:
        q0, grid = _start(w, sigma, fmt, options, init)
        q = coordinate_descent(w, sigma, grid, q0, iterations=options.iterations, relax=options.relax,
                               block_size=options.block_size)
    qt = grid.qtensor(q)
    out = fmt.dequantize(qt) if h is None else fmt.dequantize(qt) + h
    return SolveResult(qt, out, layer_loss(weight, out, gram), h)


@register_solver("quantease", QuantEaseOptions, needs_calibration=True, extra_bits=_extra_bits)
def solve_quantease(weight: Tensor, fmt: Format, gram: Tensor | None, options: QuantEaseOptions) -> SolveResult:
    return _solve(weight, fmt, gram, options, "rtn")


@register_solver("gptq+quantease", QuantEaseOptions, needs_calibration=True, extra_bits=_extra_bits)
def solve_gptq_quantease(weight: Tensor, fmt: Format, gram: Tensor | None, options: QuantEaseOptions) -> SolveResult:
    return _solve(weight, fmt, gram, options, "gptq")
