"""Round-to-nearest: each group is fitted and rounded independently."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.formats import Format
from mixq.solvers.outliers import check_fraction, outlier_bits, salient_mask
from mixq.solvers.registry import SolveResult, register_solver


@dataclass(frozen=True)
class RTNOptions:
    outliers: float = 0.0  # fraction of weights (of columns, if structured) kept in 16 bits, the rest rounded
    structured: bool = False  # outliers as whole columns

    def __post_init__(self) -> None:
        check_fraction("rtn", self.outliers)


def quadratic_form(d: Tensor, gram: Tensor) -> float:
    """tr(D H Dᵀ): for D = W − Ŵ the layer reconstruction error ‖WX − ŴX‖² per token (the one
    place mixq computes it)."""
    d = d.float()
    return float(((d @ gram.float()) * d).sum())


def layer_loss(weight: Tensor, approx: Tensor, gram: Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the layer reconstruction error ‖WX − ŴX‖² per token."""
    return quadratic_form(weight.float() - approx.float(), gram)


def _extra_bits(options: RTNOptions, shape: tuple[int, int]) -> int:
    return outlier_bits(options.outliers, options.structured, shape)


@register_solver("rtn", RTNOptions, needs_calibration=False, extra_bits=_extra_bits)
def solve_rtn(weight: Tensor, fmt: Format, gram: Tensor | None, options: RTNOptions) -> SolveResult:
    """Round to nearest; with ``outliers``, the most salient weights (by |W|·√diag(Σ) when a
    Gram is given, else |W|) stay in 16 bits and out of the groups' ranges."""
    if not options.outliers:
        q = fmt.quantize(weight)
        w_hat = fmt.dequantize(q)
        return SolveResult(q, w_hat, None if gram is None else layer_loss(weight, w_hat, gram))
    w = weight.float()
    keep = salient_mask(w, gram, options.outliers, options.structured)
    q = fmt.quantize(w.masked_fill(keep, 0))
    w_hat = fmt.dequantize(q)
    outliers = torch.where(keep, w - w_hat, torch.zeros_like(w))
    w_hat = w_hat + outliers
    return SolveResult(q, w_hat, None if gram is None else layer_loss(weight, w_hat, gram), outliers)
