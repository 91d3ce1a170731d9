"""The Gram accumulator every calibrated solver shares: H = mean over tokens of x xᵀ (fp32)."""

from __future__ import annotations

import torch
from torch import Tensor


class Gram:
    """Running mean of x xᵀ over the rows of every batch added."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)
        n, m = self.tokens, x.shape[0]
        if m == 0:
            return
        self.matrix.mul_(n / (n + m)).addmm_(x.T, x, alpha=1.0 / (n + m))
        self.tokens = n + m
