"""Round-to-nearest: each group is fitted and rounded independently."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mixq.formats import Format
from mixq.solvers.registry import SolveResult, register_solver


@dataclass(frozen=True)
class RTNOptions:
    """RTN has no options."""


def layer_loss(weight: Tensor, approx: Tensor, gram: Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the layer reconstruction error ‖WX − ŴX‖² per token."""
    d = (weight.float() - approx.float())
    return float(((d @ gram.float()) * d).sum())


@register_solver("rtn", RTNOptions, needs_calibration=False)
def solve_rtn(weight: Tensor, fmt: Format, gram: Tensor | None, options: RTNOptions) -> SolveResult:
    q = fmt.quantize(weight)
    w_hat = fmt.dequantize(q)
    return SolveResult(q, w_hat, None if gram is None else layer_loss(weight, w_hat, gram))
