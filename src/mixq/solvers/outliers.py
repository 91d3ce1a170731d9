"""Outliers kept in 16 bits beside the quantized codes: W ≈ Q + H with H sparse.

Shared by every solver that takes ``outliers`` (a fraction of the weights, or of the
columns with ``structured``): RTN and GPTQ keep the most salient weights and quantize the
rest; outlier-aware QuantEase (Algorithm 3) starts from the same choice and then moves H
by iterative hard thresholding.  Sizes are exact: what the checkpoint stores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixq.errors import PlanError


def check_fraction(solver: str, fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise PlanError(f"{solver}: outliers must be a fraction in [0, 1), got {fraction}")


def sparse_outlier_bits(rows: int, entries: int, cols: int) -> int:
    """CSR storage: a 16-bit value and a column index per entry, 32-bit row offsets."""
    index_bits = 16 if cols <= 2**16 else 32
    return entries * (16 + index_bits) + (rows + 1) * 32 if entries else 0


def column_outlier_bits(rows: int, columns: int) -> int:
    """Whole columns kept in 16 bits, each with a 32-bit column index."""
    return columns * (rows * 16 + 32)


def outlier_count(fraction: float, shape: tuple[int, int], structured: bool) -> int:
    """Outliers kept: entries (unstructured) or whole columns (structured)."""
    rows, cols = shape
    return round(fraction * cols) if structured else round(fraction * rows * cols)


def outlier_bits(fraction: float, structured: bool, shape: tuple[int, int]) -> int:
    if fraction == 0:
        return 0
    n = outlier_count(fraction, shape, structured)
    return column_outlier_bits(shape[0], n) if structured else sparse_outlier_bits(shape[0], n, shape[1])


def hard_threshold(x: Tensor, keep: int, structured: bool) -> Tensor:
    """Projection onto matrices with ``keep`` non-zero entries (or whole columns)."""
    out = torch.zeros_like(x)
    if keep <= 0:
        return out
    if structured:
        cols = torch.topk(x.norm(dim=0), keep).indices
        out[:, cols] = x[:, cols]
    else:
        idx = torch.topk(x.abs().flatten(), keep).indices
        out.view(-1)[idx] = x.view(-1)[idx]
    return out


def salient_mask(w: Tensor, gram: Tensor | None, fraction: float, structured: bool) -> Tensor:
    """The weights the layer objective weighs most, |W_ij|·√Σ_jj (|W_ij| without a Gram), or
    the columns with the largest Σ_jj‖W_j‖²: a boolean mask of ``w``'s shape."""
    keep = outlier_count(fraction, tuple(w.shape), structured)
    score = w if gram is None else w * torch.diag(gram).float().clamp_min(0).sqrt().unsqueeze(0)
    mask = torch.zeros_like(w, dtype=torch.bool)
    if keep <= 0:
        return mask
    if structured:
        mask[:, torch.topk(score.norm(dim=0), keep).indices] = True
    else:
        mask.view(-1)[torch.topk(score.abs().flatten(), keep).indices] = True
    return mask


def salient(w: Tensor, gram: Tensor | None, fraction: float, structured: bool) -> Tensor:
    """H: ``w`` on ``salient_mask``, zero elsewhere."""
    return torch.where(salient_mask(w, gram, fraction, structured), w, torch.zeros_like(w))
