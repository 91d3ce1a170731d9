"""Trace estimators on any loss: pure functions of (loss_fn, parameters, samples).

* Hutchinson: tr(H_l) = E[vᵀ H v] for Rademacher v.  One Hessian-vector product with a
  probe over *all* requested parameters gives an unbiased estimate for *every* block
  H_ll at once: the cross terms v_lᵀ H_lm v_m (l ≠ m) have zero mean because the probes
  of different parameters are independent.  ``per_layer=True`` probes one parameter at a
  time instead (lower variance, less memory, one pass per parameter).
* Empirical Fisher (FIT, Zandonati et al. 2022): tr(F_l) = mean over samples of
  ‖∇_l ℓ(sample)‖², accumulated in one pass over the samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def shifted_nll(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token negative log-likelihood: logits at t predict token t+1."""
    logits = model(batch, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1))


@dataclass(frozen=True)
class TraceEstimate:
    trace: float  # estimated trace of the parameter's block
    stderr: float  # standard error of that estimate
    iterations: int
    numel: int

    @property
    def per_param(self) -> float:
        return self.trace / self.numel

    def to_dict(self) -> dict[str, float | int]:
        return {"trace": self.trace, "stderr": self.stderr, "per_param": self.per_param,
                "per_param_stderr": self.stderr / self.numel, "iterations": self.iterations}


def _stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.inf
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def hutchinson_trace(loss_fn: Callable[[object], Tensor], params: dict[str, Tensor], samples: Sequence[object], *,
                     max_iter: int = 100, tol: float = 1e-2, min_iter: int = 5, per_layer: bool = False,
                     seed: int = 0, progress: Callable[[int], None] | None = None,
                     max_seconds: float | None = None, samples_per_probe: int | None = None) -> dict[str, TraceEstimate]:
    """Hutchinson estimates of tr(∂²L/∂p²) for each parameter (L = mean loss over ``samples``).

    Stops once every estimate's standard error is below ``tol`` × |estimate| (after
    ``min_iter`` probes), after ``max_iter`` probes, or once ``max_seconds`` have passed
    (at least two probes; the standard errors say how far the estimate got).

    ``samples_per_probe`` (default: all) gives each probe the next few samples, cycling:
    still unbiased for the trace of the mean loss's Hessian (probe and sample are drawn
    independently), and far cheaper per probe, so a time budget buys many more probes;
    the standard error then includes the variation between samples.
    """
    import time

    start = time.perf_counter()
    groups = [[n] for n in params] if per_layer else [list(params)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, TraceEstimate] = {}
    for names in groups:
        tensors = [params[n] for n in names]
        draws: dict[str, list[float]] = {n: [] for n in names}
        for it in range(max_iter):
            probes = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.device, t.dtype) for t in tensors]
            acc = torch.zeros(len(names), dtype=torch.float64, device=tensors[0].device)
            if samples_per_probe is None or samples_per_probe >= len(samples):
                chunk = list(samples)
            else:
                chunk = [samples[(it * samples_per_probe + j) % len(samples)] for j in range(samples_per_probe)]
            for sample in chunk:
                loss = loss_fn(sample) / len(chunk)
                grads = torch.autograd.grad(loss, tensors, create_graph=True)
                dot = sum((g * v).sum() for g, v in zip(grads, probes))
                hv = torch.autograd.grad(dot, tensors)
                acc += torch.stack([(h * v).sum(dtype=torch.float64) for h, v in zip(hv, probes)])  # no host sync
            for n, a in zip(names, acc.tolist()):
                draws[n].append(a)
            if progress is not None:
                progress(it)
            if it + 1 >= min_iter and all(abs(_stats(d)[1]) <= tol * abs(_stats(d)[0]) for d in draws.values()):
                break
            if max_seconds is not None and it >= 1 and time.perf_counter() - start > max_seconds * len(out) / len(params) \
                    + max_seconds * len(names) / len(params):
                break
        for n, t in zip(names, tensors):
            mean, se = _stats(draws[n])
            out[n] = TraceEstimate(mean, se, len(draws[n]), t.numel())
    return out


def fisher_trace(loss_fn: Callable[[object], Tensor], params: dict[str, Tensor],
                 samples: Iterable[object]) -> dict[str, TraceEstimate]:
    """Empirical Fisher trace per parameter: mean over samples of the squared gradient norm."""
    names, tensors = list(params), list(params.values())
    draws: dict[str, list[float]] = {n: [] for n in names}
    for sample in samples:
        grads = torch.autograd.grad(loss_fn(sample), tensors)
        for n, g in zip(names, grads):
            draws[n].append(float(g.double().pow(2).sum()))
    out = {}
    for n, t in zip(names, tensors):
        mean, se = _stats(draws[n])
        out[n] = TraceEstimate(mean, se, len(draws[n]), t.numel())
    return out
