"""Apply a plan to a model in place (fake-quant) and keep the codes for export."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.errors import MixqError, PlanError
from mixq.formats import QTensor
from mixq.models import module_by_name, transformer_blocks
from mixq.plan import LayerSpec, Plan
from mixq.solvers import get_solver


CALIBRATION_MODES = ("sequential", "independent")  # each block fed by the quantized ones / Grams of the base model


@dataclass(frozen=True)
class QuantizedLayer:
    spec: LayerSpec
    qtensor: QTensor
    loss: float | None = None  # tr((W-Ŵ) H (W-Ŵ)ᵀ) on the calibration Gram
    rel_error: float | None = None  # ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs
    rtn_rel_error: float | None = None  # the same for RTN with the same format
    seconds: float = 0.0
    outliers: Tensor | None = None  # the 16-bit sparse part: weight = dequantize(qtensor) + outliers


@dataclass(frozen=True)
class QuantizeResult:
    layers: dict[str, QuantizedLayer]
    seconds: float

    def report(self) -> list[dict[str, Any]]:
        """Per layer: format, solver, relative reconstruction error against RTN's."""
        return [{"layer": n, "format": l.spec.format.name, "solver": l.spec.solver, "rel_error": l.rel_error,
                 "rtn_rel_error": l.rtn_rel_error, "seconds": l.seconds} for n, l in self.layers.items()]


@torch.no_grad()
def quantize_(model: nn.Module, plan: Plan, *, calibration: Tensor | Mapping[str, Tensor] | None = None,
              device: torch.device | str | None = None, batch_size: int = 8, progress: bool = False,
              log: Callable[[str], None] | None = None, true_sequential: bool = True,
              calibration_mode: str = "sequential") -> QuantizeResult:
    """Replace every planned weight by its dequantised value; return the codes.

    With ``calibration`` windows ([n, seqlen] token ids), or for an encoder a tokenizer's
    batch of padded sentences (``input_ids``, ``attention_mask``...), the layers inside
    transformer blocks are solved block by block on their Gram matrices (required by GPTQ
    and QuantEase); the others (and every layer without calibration) with their solver alone.
    ``calibration_mode="independent"`` takes every Gram from the unquantized model instead of
    feeding each block the quantized ones (as a layer database is solved).
    """
    from mixq.calibration import quantize_sequential_
    from mixq.calibration.independent import quantize_independent_

    if calibration_mode not in CALIBRATION_MODES:
        raise MixqError(f"calibration mode {calibration_mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
    start = time.perf_counter()
    specs = plan.resolve(model)
    out: dict[str, QuantizedLayer] = {}
    if calibration is not None:
        prefix = transformer_blocks(model)[0] + "."
        inside = {n: s for n, s in specs.items() if n.startswith(prefix)}
        if calibration_mode == "independent":
            records = quantize_independent_(model, inside, calibration, device=device, batch_size=batch_size,
                                            progress=progress)
        else:
            records = quantize_sequential_(model, inside, calibration, device=device, batch_size=batch_size,
                                           progress=progress, log=log, true_sequential=true_sequential)
        for rec in records:
            out[rec.name] = QuantizedLayer(rec.spec, rec.result.qtensor, rec.result.loss, rec.rel_error,
                                           rec.rtn_rel_error, rec.seconds, rec.result.outliers)
    rest = {n: s for n, s in specs.items() if n not in out}
    for name, spec in rest.items():
        if get_solver(spec.solver).needs_calibration:
            where = "needs calibration data" if calibration is None else "is outside the transformer blocks (use rtn)"
            raise PlanError(f"layer {name!r}: solver {spec.solver!r}: the layer {where}")
    for name, spec in tqdm(rest.items(), desc="quantize", disable=not progress, leave=False):
        weight = module_by_name(model, name).weight
        solver = get_solver(spec.solver)
        t = time.perf_counter()
        try:
            result = solver(weight.data, spec.format, None, solver.options(spec.opts))
        except MixqError as e:
            raise type(e)(f"layer {name!r}: {e}") from None
        if not torch.isfinite(result.weight).all():
            raise MixqError(f"layer {name!r}: quantization produced NaN/inf; refusing to write it")
        weight.data.copy_(result.weight.to(weight.dtype))
        out[name] = QuantizedLayer(spec, result.qtensor, seconds=time.perf_counter() - t, outliers=result.outliers)
    order = list(specs)
    return QuantizeResult({n: out[n] for n in order}, time.perf_counter() - start)


@contextmanager
def quantized_copy(base: nn.Module, plan: Plan, *, calibration: Tensor | Mapping[str, Tensor] | None = None,
                   device: torch.device | str | None = None, batch_size: int = 8, progress: bool = False,
                   log: Callable[[str], None] | None = None,
                   calibration_mode: str = "sequential") -> Iterator[tuple[nn.Module, QuantizeResult | None]]:
    """``(model, result)``: the base model itself (result None) for a plan that quantizes nothing
    by design (``base``), else a quantized deep copy, freed on exit.  A plan that names formats but
    matches no layer of this model is an error, never evaluated as if it were quantized."""
    specs = plan.resolve(base)
    if not specs:
        if not plan.is_base:
            raise PlanError(f"plan {plan.describe()!r} quantizes no layer of this model "
                            f"({type(base).__name__}): check its rules and the model's layer names")
        yield base, None
        return
    model = copy.deepcopy(base)
    try:
        result = quantize_(model, plan, calibration=calibration, device=device, batch_size=batch_size,
                           progress=progress, log=log, calibration_mode=calibration_mode)
        yield model, result
    finally:
        del model
