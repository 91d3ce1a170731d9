"""Independent calibration: every layer solved alone on the base model's Gram of its input.

Unlike the sequential pass (each block fed by the already-quantized ones), no layer sees what
quantizing another did: this is how a layer database is solved, so a plan applied this way
reproduces a trial that swapped database weights in.  ``solve_layer`` is the one solve both use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.calibration.grams import block_grams
from mixq.calibration.sequential import Calibration, LayerRecord, _relative
from mixq.errors import MixqError
from mixq.layers import read_weight, write_weight
from mixq.plan import LayerSpec
from mixq.solvers import get_solver


def solve_layer(name: str, weight: Tensor, spec: LayerSpec, gram: Tensor | None) -> LayerRecord:
    """``spec``'s solver on one weight and its input Gram, with its error and RTN's relative to ‖WX‖²."""
    solver = get_solver(spec.solver)
    if gram is None and solver.needs_calibration:
        raise MixqError(f"layer {name!r}: solver {spec.solver!r} needs calibration data")
    start = time.perf_counter()
    try:
        result = solver(weight, spec.format, gram, solver.options(spec.opts))
    except MixqError as e:
        raise type(e)(f"layer {name!r}: {e}") from None
    seconds = time.perf_counter() - start
    if not torch.isfinite(result.weight).all():
        raise MixqError(f"layer {name!r}: {spec.solver} produced NaN/inf; refusing to write it")
    if gram is None:
        return LayerRecord(name, spec, result, float("nan"), float("nan"), seconds)
    rtn = get_solver("rtn")
    base = rtn(weight, spec.format, gram, rtn.options({}))
    return LayerRecord(name, spec, result, _relative(result.loss or 0.0, weight, gram),
                       _relative(base.loss or 0.0, weight, gram), seconds)


@torch.no_grad()
def quantize_independent_(model: nn.Module, specs: Mapping[str, LayerSpec], windows: Calibration, *,
                          device: torch.device | str | None = None, batch_size: int = 8,
                          progress: bool = False) -> list[LayerRecord]:
    """Quantize the planned layers inside the transformer blocks, in place, each on its Gram from
    the unquantized model (one calibration pass, ``block_grams``)."""
    records = []
    bar = tqdm(total=len(specs), desc="calibrate (independent)", disable=not progress, leave=False)
    for _, grams in block_grams(model, windows, specs, batch_size=batch_size, device=device):
        for name, gram in grams.items():
            weight = read_weight(model, name)
            rec = solve_layer(name, weight.to(gram.device), specs[name], gram)
            write_weight(model, name, rec.result.weight.to(weight.dtype))
            records.append(rec)
            bar.update(1)
    bar.close()
    return records


__all__ = ["quantize_independent_", "solve_layer"]
