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
from mixq.models import matrix_by_name, transformer_blocks
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
    batch of padded sentences (``input_ids``, ``attention_mask``...), every planned matrix
    but the embedding is solved on the Gram of its input (required by GPTQ and QuantEase):
    block by block, then lm_head and other layers outside the blocks (see
    ``mixq.calibration.sequential``); the embedding, and every matrix without calibration,
    with its solver alone.

    ``result.layers`` holds one entry per matrix, in plan order: a layer under its name,
    stacked experts one per expert, ``<parameter>.<e>`` (``model.layers.0.mlp.experts.down_proj.3``),
    each with the 2-D codes of that expert's ``[out, in]`` matrix.
    ``calibration_mode="independent"`` takes every Gram from the unquantized model instead of
    feeding each block the quantized ones (as a layer database is solved); it covers the 2-D
    matrices inside the blocks.
    """
    from mixq.calibration import quantize_sequential_
    from mixq.calibration.independent import quantize_independent_

    if calibration_mode not in CALIBRATION_MODES:
        raise MixqError(f"calibration mode {calibration_mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
    start = time.perf_counter()
    specs = plan.resolve(model)
    matrices = {n: matrix_by_name(model, n) for n in specs}
    free = {n: s for n, s in specs.items() if calibration is None or isinstance(matrices[n].module, nn.Embedding)}
    for name, spec in free.items():
        if get_solver(spec.solver).needs_calibration:
            where = ("needs calibration data" if calibration is None else
                     "is an embedding: it reads no activations to calibrate on (use rtn; a tied lm_head is calibrated "
                     "under the name lm_head)")
            raise PlanError(f"layer {name!r}: solver {spec.solver!r}: the layer {where}")
    out: dict[str, QuantizedLayer] = {}
    for name, spec in tqdm(free.items(), desc="quantize", disable=not progress, leave=False):
        solver = get_solver(spec.solver)
        for part in matrices[name].parts():
            t = time.perf_counter()
            try:
                result = solver(part.get(), spec.format, None, solver.options(spec.opts))
            except MixqError as e:
                raise type(e)(f"layer {part.name!r}: {e}") from None
            if not torch.isfinite(result.weight).all():
                raise MixqError(f"layer {part.name!r}: quantization produced NaN/inf; refusing to write it")
            part.set(result.weight)
            out[part.name] = QuantizedLayer(spec, result.qtensor, seconds=time.perf_counter() - t,
                                            outliers=result.outliers)
    calibrated = {n: s for n, s in specs.items() if n not in free}
    if calibrated:
        if calibration_mode == "independent":
            prefix = transformer_blocks(model)[0] + "."
            other = [n for n in calibrated if not n.startswith(prefix) or matrices[n].stacked]
            if other:
                raise PlanError(f"layer {other[0]!r}: independent calibration covers the 2-D matrices inside the "
                                "transformer blocks (calibrate it sequentially, or use rtn)")
            records = quantize_independent_(model, calibrated, calibration, device=device, batch_size=batch_size,
                                            progress=progress)
        else:
            records = quantize_sequential_(model, calibrated, calibration, device=device, batch_size=batch_size,
                                           progress=progress, log=log, true_sequential=true_sequential)
        for rec in records:
            out[rec.name] = QuantizedLayer(rec.spec, rec.result.qtensor, rec.result.loss, rec.rel_error,
                                           rec.rtn_rel_error, rec.seconds, rec.result.outliers)
    order = [part.name for m in matrices.values() for part in m.parts()]
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
