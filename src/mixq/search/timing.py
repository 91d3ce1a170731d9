"""The loop the weight cache replaces, timed for the report."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from mixq.evaluate import perplexity
from mixq.models import matrix_by_name
from mixq.search.space import SearchSpace, Unit


@torch.no_grad()
def requantize_seconds(model: nn.Module, space: SearchSpace, units: list[Unit], assignments: list[dict[str, str]],
                       score_windows: Tensor, *, batch_size: int) -> list[float]:
    """Seconds per trial of the loop the weight cache replaces: put the full-precision weights
    back (from a copy in host memory), quantize every searched layer from scratch, score."""
    from mixq.quantize import quantize_

    plans = [space.plan(units, a) for a in assignments]
    layers = {n for p in plans for n in p.resolve(model)}
    matrices = {n: matrix_by_name(model, n) for n in layers}
    host = {n: m.get().detach().to("cpu", copy=True) for n, m in matrices.items()}
    out = []
    try:
        for plan in plans:
            t = time.perf_counter()
            for n, w in host.items():
                matrices[n].set(w)
            quantize_(model, plan.with_solver("rtn"))
            perplexity(model, score_windows, batch_size=batch_size)
            out.append(time.perf_counter() - t)
    finally:
        for n, w in host.items():
            matrices[n].set(w)
    return out


__all__ = ["requantize_seconds"]
