"""Statistic profiles (``mixq profile``): per quantizable layer, the min, max, mean, std,
largest magnitude and percentiles of its weight and of its inputs on calibration windows,
and the fixed-point fraction width a profile gives a layer (the second seed's "search with
statistic profiles": the width is searched, the fraction width follows from the range).

Weights: every statistic is exact (percentiles interpolate linearly between order
statistics, as ``numpy.percentile``).  Inputs: one pass over the windows with a forward
pre-hook on each layer, nothing kept but running sums: min, max, mean and std are exact
(mean and variance merged batch by batch in float64, Chan et al.'s pairwise update);
percentiles are approximate, from a uniform random sample of about ``sample_size`` input
elements per layer (drawn with replacement at one fixed rate from every batch, seeded;
exact when the layer sees no more than ``sample_size`` elements).

A fixed-point format ``fxp{W}-f{F}`` holds ``code · 2^-F`` with W-bit two's-complement codes,
so ``W − 1 − F`` integer bits; the profile's rule gives a layer with largest weight
magnitude ``a`` the fraction width ``F = W − 1 − ceil(log2 a)``, the most fraction bits whose
range still reaches ``a`` (up to one step below a power of two, where it saturates).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mixq.errors import MixqError, PlanError

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
SAMPLE_SIZE = 65536  # input elements sampled per layer for the percentiles (2^16)
PROFILE_VERSION = 1


def _weight(model: nn.Module, name: str) -> Tensor:
    """The [out, in] weight of a layer."""
    from mixq.models import matrix_by_name

    return matrix_by_name(model, name).get().detach()


def _percentiles(x: Tensor, percentiles: Sequence[float]) -> dict[str, float]:
    """Linear interpolation between order statistics (``numpy.percentile``'s default)."""
    s = torch.sort(x.flatten().double()).values
    out = {}
    for p in percentiles:
        pos = p / 100 * (s.numel() - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        hi = min(lo + 1, s.numel() - 1)
        out[f"{p:g}"] = float(s[lo] + (s[hi] - s[lo]) * frac)
    return out


def tensor_stats(x: Tensor, percentiles: Sequence[float] = PERCENTILES) -> dict[str, Any]:
    """Exact statistics of every element of ``x``."""
    d = x.detach().double()
    lo, hi = float(d.min()), float(d.max())
    return {"count": d.numel(), "min": lo, "max": hi, "absmax": max(-lo, hi), "mean": float(d.mean()),
            "std": float(d.std(unbiased=False)), "percentiles": _percentiles(d, percentiles)}


class RunningStats:
    """Exact count, min, max, mean and variance of a stream of tensors, and a uniform sample of it."""

    def __init__(self, rate: float, generator: torch.Generator) -> None:
        self.rate, self.generator = rate, generator
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[Tensor] = []

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            return
        var, mean = torch.var_mean(flat.double(), unbiased=False)
        m, m2 = float(mean), float(var) * n
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.rate < 1:  # else every element is kept
            idx = torch.randint(0, n, (max(1, round(n * self.rate)),), generator=self.generator)
            flat = flat[idx.to(flat.device)]
        self.samples.append(flat.float().cpu())

    def finish(self, percentiles: Sequence[float]) -> dict[str, Any]:
        sample = torch.cat(self.samples)
        return {"count": self.count, "min": self.lo, "max": self.hi, "absmax": max(-self.lo, self.hi),
                "mean": self.mean, "std": math.sqrt(self.m2 / self.count),
                "percentiles": _percentiles(sample, percentiles), "sampled": sample.numel()}


@torch.no_grad()
def profile_model(model: nn.Module, windows: Tensor | None = None, *, batch_size: int = 8,
                  percentiles: Sequence[float] = PERCENTILES, sample_size: int = SAMPLE_SIZE,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per quantizable layer: ``shape``, ``weight`` statistics and, given ``windows`` ([n, seqlen]
    token ids), ``input`` statistics over every token of every window."""
    from mixq.models import quantizable_matrices

    if any(not 0 <= p <= 100 for p in percentiles):
        raise MixqError(f"percentiles must lie in [0, 100], got {list(percentiles)}")
    if sample_size < 1:
        raise MixqError(f"--sample-size must be positive, got {sample_size}")
    layers = {n: m.module for n, m in quantizable_matrices(model).items()}  # the module whose input the matrix reads
    out: dict[str, dict[str, Any]] = {}
    for name in layers:
        w = _weight(model, name)
        out[name] = {"shape": list(w.shape), "weight": tensor_stats(w, percentiles)}
    if windows is None:
        return out
    generator = torch.Generator().manual_seed(seed)
    running = {n: RunningStats(min(1.0, sample_size / (windows.numel() * _weight(model, n).shape[-1])), generator)
               for n in layers}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: running[n].update(args[0])) for n, m in layers.items()]
    device = next(model.parameters()).device
    try:
        for i in range(0, len(windows), batch_size):
            model(windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    for n in layers:
        out[n]["input"] = running[n].finish(percentiles)
    return out


# -- the fraction width rule ------------------------------------------------------------
def fraction_bits(width: int, absmax: float) -> int:
    """``width − 1 − ceil(log2 absmax)``: the fraction bits of a ``width``-bit fixed-point
    format whose range reaches ``absmax``."""
    if not math.isfinite(absmax) or absmax <= 0:
        raise PlanError(f"a fraction width needs a positive, finite max |w|, got {absmax}")
    return width - 1 - math.ceil(math.log2(absmax))


def fraction_format(layer: str, width: int, absmax: float) -> str:
    """The fixed-point format ``fxp{width}-f{F}`` the profile gives ``layer``; a fraction width
    above the width or below zero is an error naming the layer."""
    f = fraction_bits(width, absmax)
    rule = f"{width} − 1 − ceil(log2 {absmax:.6g}) = {f}"
    if f > width:
        raise PlanError(f"layer {layer!r}: fxp{width} with profiled max |w| {absmax:.6g} gets {f} fraction bits "
                        f"({rule}), more than the width {width}; search wider formats or use scaled ones")
    if f < 0:
        raise PlanError(f"layer {layer!r}: fxp{width} with profiled max |w| {absmax:.6g} gets {f} fraction bits "
                        f"({rule}): a negative fraction width")
    return f"fxp{width}-f{f}"


def read_absmax(path: str | Path) -> dict[str, float]:
    """Layer -> largest weight magnitude, from a profile file."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"profile file not found: {path}")
    try:
        data = json.loads(path.read_text())
        return {str(n): float(d["weight"]["absmax"]) for n, d in data["layers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PlanError(f"{path} is not a profile (mixq profile --out): expected layers.<name>.weight.absmax") from None


__all__ = ["PERCENTILES", "PROFILE_VERSION", "RunningStats", "SAMPLE_SIZE", "fraction_bits", "fraction_format",
           "profile_model", "read_absmax", "tensor_stats"]
