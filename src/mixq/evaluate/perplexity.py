"""Perplexity (WikiText-2 protocol of the GPTQ/QuantEase papers) and KL to a base model.

Each window is scored on its own: the NLL of tokens 1..L-1 given their prefix.  The
NLL is summed in float32 (float64 across batches) and perplexity is exp(mean NLL).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood
    tokens: int  # scored tokens
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, "eval_seconds": self.seconds}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, batch: Tensor) -> Tensor:
    return model(batch.to(_device(model)), use_cache=False).logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 8, progress: bool = False) -> PerplexityResult:
    """Perplexity over ``windows`` [n, L], evaluated ``batch_size`` windows at a time."""
    device = _device(model)
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i in tqdm(range(0, len(windows), batch_size), desc="ppl", disable=not progress, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = _logits(model, batch)[:, :-1]
        target = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), reduction="sum")
        total += nll.double()
        count += target.numel()
    _sync(device)
    mean = float(total) / count
    return PerplexityResult(math.exp(mean), mean, count, len(windows), time.perf_counter() - start)


@torch.no_grad()
def perplexity_unbatched(model: nn.Module, windows: Tensor) -> PerplexityResult:
    """The reference loop (one window at a time, as GPTQ's eval): for speed comparisons."""
    device = _device(model)
    start = time.perf_counter()
    nlls = []
    for i in range(len(windows)):
        batch = windows[i : i + 1].to(device)
        logits = _logits(model, batch)[:, :-1].float()
        nlls.append(F.cross_entropy(logits[0], batch[0, 1:]).item())
    _sync(device)
    mean = sum(nlls) / len(nlls)
    return PerplexityResult(math.exp(mean), mean, len(windows) * (windows.shape[1] - 1), len(windows), time.perf_counter() - start)


def log_probs(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token log-probabilities (float32) of every position of ``batch``."""
    return F.log_softmax(_logits(model, batch).float(), dim=-1)


def kl_sum(log_p: Tensor, model: nn.Module, batch: Tensor) -> Tensor:
    """Σ over the positions of ``batch`` of KL(p ‖ q), q the model's next-token distribution (float64)."""
    q = log_probs(model, batch)
    return F.kl_div(q, log_p.to(q.device), log_target=True, reduction="sum").double()


@torch.no_grad()
def kl_divergence(base: nn.Module, quantized: nn.Module, windows: Tensor, *, batch_size: int = 8) -> float:
    """Mean over tokens of KL(p_base ‖ p_quantized) of the next-token distributions (nats);
    the base's log-probabilities are computed batch by batch, never all at once."""
    device = _device(quantized)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        total += kl_sum(log_probs(base, batch), quantized, batch)
    return float(total) / windows.numel()
