"""Sensitivity of a causal LM's quantizable matrices: Hessian trace, Fisher trace (FIT), and
the measured KL to the base model when one layer alone is quantized.

The traces are taken with respect to each layer's parameter as stored (a Conv1D's
``[in, out]``, a stack of experts ``[E, out, in]``): a trace is the same for any arrangement of the
parameter's elements, so no transpose needs undoing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mixq.errors import MixqError
from mixq.formats import parse_format
from mixq.layers import read_weight, stored_bits, write_weight
from mixq.models import each_matrix, matrix_by_name
from mixq.plan import LayerSpec
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


LOG_PROB_BYTES = 2**31  # base log-probabilities held at once by ``measured`` (2 GiB)


Weights = Callable[[str, str], Tensor]  # (layer, choice) -> its quantized weight, in the model's dtype and device


@torch.no_grad()
def measured(model: nn.Module, windows: Tensor, layers: list[str], formats: list[str], *,
             batch_size: int, memory_bytes: int = LOG_PROB_BYTES, weights: Weights | None = None) -> dict[str, dict[str, float]]:
    """KL(base ‖ model with only this layer quantized), mean per token, for each format (choice).

    The windows go in chunks whose base log-probabilities fit ``memory_bytes`` (at the default
    128 × 2048 windows of a 49k vocabulary, all of them would take 51.5 GB); each chunk is
    scored under every (layer, format), the quantized weight taken from ``weights`` (default:
    RTN of the format, recomputed per chunk; a layer database's solutions for calibrated choices)."""
    from mixq.evaluate import kl_sum, log_probs

    dev = _device(model)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    per_window = windows.shape[1] * (vocab or 1) * 4
    chunk = max(batch_size, (max(memory_bytes // per_window, 1) // batch_size) * batch_size)
    totals = {n: {f: torch.zeros((), dtype=torch.float64, device=dev) for f in formats} for n in layers}
    for c in range(0, len(windows), chunk):
        batches = [windows[i : i + batch_size].to(dev) for i in range(c, min(c + chunk, len(windows)), batch_size)]
        base = [log_probs(model, b) for b in batches]
        for n in layers:
            original = read_weight(model, n).clone()
            for f in formats:
                write_weight(model, n, each_matrix(original, parse_format(f).fake_quantize) if weights is None
                             else weights(n, f))
                for b, p in zip(batches, base):
                    totals[n][f] += kl_sum(p, model, b)
            write_weight(model, n, original)
        del base
    return {n: {f: float(t) / windows.numel() for f, t in d.items()} for n, d in totals.items()}


@torch.no_grad()
def geometry(model: nn.Module, layers: list[str], formats: list[str], *, specs: Mapping[str, LayerSpec] | None = None,
             weights: Weights | None = None) -> dict[str, dict[str, Any]]:
    """Per layer: parameter count, exact stored bits and squared quantization error of each
    format, or of each choice given its ``specs`` (the solvers' extra bits counted) and ``weights``."""
    out = {}
    for n in layers:
        matrix = matrix_by_name(model, n)
        w = matrix.get().detach().float()
        out[n] = {"params": w.numel(), "bits": {}, "noise": {}}
        for f in formats:
            try:
                out[n]["bits"][f] = stored_bits(specs[f] if specs is not None else LayerSpec.of(f), matrix.shape) * matrix.count
            except MixqError as e:
                raise MixqError(f"layer {n!r}: {e}") from None
            approx = each_matrix(w, parse_format(f).fake_quantize) if weights is None else weights(n, f).float()
            out[n]["noise"][f] = float((approx - w).pow(2).sum())
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
