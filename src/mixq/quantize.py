"""Apply a plan to a model in place (fake-quant) and keep the codes for export."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mixq.errors import MixqError, PlanError
from mixq.formats import QTensor
from mixq.models import module_by_name
from mixq.plan import LayerSpec, Plan
from mixq.solvers import get_solver


@dataclass(frozen=True)
class QuantizedLayer:
    spec: LayerSpec
    qtensor: QTensor
    loss: float | None


@dataclass(frozen=True)
class QuantizeResult:
    layers: dict[str, QuantizedLayer]
    seconds: float


@torch.no_grad()
def quantize_(model: nn.Module, plan: Plan, *, progress: bool = False) -> QuantizeResult:
    """Replace every planned weight by its dequantised value; return the codes.

    Data-free solvers only; calibrated ones (GPTQ, QuantEase) go through the
    calibration pipeline, which feeds them each layer's Gram matrix.
    """
    start = time.perf_counter()
    specs = plan.resolve(model)
    for name, spec in specs.items():
        if get_solver(spec.solver).needs_calibration:
            raise PlanError(f"layer {name!r}: solver {spec.solver!r} needs calibration data")
    out: dict[str, QuantizedLayer] = {}
    for name, spec in tqdm(specs.items(), desc="quantize", disable=not progress, leave=False):
        weight = module_by_name(model, name).weight
        solver = get_solver(spec.solver)
        try:
            result = solver(weight.data, spec.format, None, solver.options(spec.opts))
        except MixqError as e:
            raise type(e)(f"layer {name!r}: {e}") from None
        if not torch.isfinite(result.weight).all():
            raise MixqError(f"layer {name!r}: quantization produced NaN/inf; refusing to write it")
        weight.data.copy_(result.weight.to(weight.dtype))
        out[name] = QuantizedLayer(spec, result.qtensor, result.loss)
    return QuantizeResult(out, time.perf_counter() - start)
