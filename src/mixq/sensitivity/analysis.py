"""Sensitivity of a causal LM's quantizable matrices: Hessian trace, Fisher trace (FIT), and
the measured KL to the base model when one layer alone is quantized.

The traces are taken with respect to each layer's parameter as stored (a Conv1D's
``[in, out]``, a stack of experts ``[E, out, in]``): a trace is the same for any arrangement of the
parameter's elements, so no transpose needs undoing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.errors import MixqError
from mixq.formats import parse_format
from mixq.models import each_matrix, matrix_by_name
from mixq.sensitivity.estimators import fisher_trace, hutchinson_trace, shifted_nll

METHODS = ("hessian", "fit", "measured")


def _weights(model: nn.Module, layers: list[str]) -> dict[str, Tensor]:
    model.requires_grad_(False)
    params = {}
    for n in layers:
        w = matrix_by_name(model, n).param
        w.requires_grad_(True)
        params[n] = w
    return params


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def hessian(model: nn.Module, windows: Tensor, layers: list[str], *, max_iter: int, tol: float, per_layer: bool,
            batch_size: int, seed: int, progress: Callable[[int], None] | None = None,
            max_seconds: float | None = None, probe_windows: int | None = None) -> dict[str, dict[str, Any]]:
    """Average Hessian trace per layer (the model must use eager attention: SDPA has no double backward)."""
    params = _weights(model, layers)
    dev = _device(model)
    batches = [windows[i : i + batch_size].to(dev) for i in range(0, len(windows), batch_size)]
    try:
        est = hutchinson_trace(lambda b: shifted_nll(model, b) * len(b) / len(windows) * len(batches), params, batches,
                               max_iter=max_iter, tol=tol, per_layer=per_layer, seed=seed, progress=progress,
                               max_seconds=max_seconds,
                               samples_per_probe=None if probe_windows is None else -(-probe_windows // batch_size))
    finally:
        model.requires_grad_(False)
    return {n: e.to_dict() for n, e in est.items()}


def fisher(model: nn.Module, windows: Tensor, layers: list[str]) -> dict[str, dict[str, Any]]:
    """Empirical Fisher trace per layer, one window per sample, in one pass."""
    params = _weights(model, layers)
    dev = _device(model)
    try:
        est = fisher_trace(lambda w: shifted_nll(model, w[None].to(dev)), params, list(windows))
    finally:
        model.requires_grad_(False)
    return {n: e.to_dict() for n, e in est.items()}


@torch.no_grad()
def measured(model: nn.Module, windows: Tensor, layers: list[str], formats: list[str], *,
             batch_size: int) -> dict[str, dict[str, float]]:
    """KL(base ‖ model with only this layer quantized), mean per token, for each format."""
    dev = _device(model)
    batches = [windows[i : i + batch_size].to(dev) for i in range(0, len(windows), batch_size)]
    base = [F.log_softmax(model(b, use_cache=False).logits.float(), -1) for b in batches]
    out: dict[str, dict[str, float]] = {}
    for n in layers:
        matrix = matrix_by_name(model, n)
        original = matrix.get().clone()
        out[n] = {}
        for f in formats:
            matrix.set(each_matrix(original, parse_format(f).fake_quantize))
            total = sum(float(F.kl_div(F.log_softmax(model(b, use_cache=False).logits.float(), -1), p,
                                       log_target=True, reduction="sum")) for b, p in zip(batches, base))
            out[n][f] = total / windows[:, :].numel()
        matrix.set(original)
    return out


@torch.no_grad()
def geometry(model: nn.Module, layers: list[str], formats: list[str]) -> dict[str, dict[str, Any]]:
    """Per layer: parameter count, exact stored bits and squared quantization error of each format."""
    out = {}
    for n in layers:
        matrix = matrix_by_name(model, n)
        w = matrix.get().detach().float()
        out[n] = {"params": w.numel(), "bits": {}, "noise": {}}
        for f in formats:
            fmt = parse_format(f)
            try:
                out[n]["bits"][f] = fmt.storage_bits(matrix.shape) * matrix.count
            except MixqError as e:
                raise MixqError(f"layer {n!r}: {e}") from None
            out[n]["noise"][f] = float((each_matrix(w, fmt.fake_quantize) - w).pow(2).sum())
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
