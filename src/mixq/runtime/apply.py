"""Run a quantized model on low-bit kernels: swap each served Linear for a kernel module."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.formats import IntFormat
from mixq.models import matrix_by_name
from mixq.quantize import QuantizedLayer
from mixq.runtime.kernels import KERNELS, KernelError, choose_kernel

_MAX_LISTED = 8  # layers named in a one-line error before "and N more"


@dataclass(frozen=True)
class KernelReport:
    """Which kernel runs each quantized layer, and why the others stay 16-bit fake-quant."""

    backend: str
    served: dict[str, str] = field(default_factory=dict)  # layer -> kernel name
    fallback: dict[str, str] = field(default_factory=dict)  # layer -> reason

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.served.values():
            out[k] = out.get(k, 0) + 1
        return out

    def require(self) -> None:
        """Raise a KernelError naming the layers no kernel serves."""
        if not self.fallback:
            return
        items = list(self.fallback.items())
        shown = "; ".join(f"{n} ({why})" for n, why in items[:_MAX_LISTED])
        more = f"; and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
        raise KernelError(f"no {self.backend} kernel serves {len(items)} layer(s): {shown}{more}")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "kernels": self.counts(), "served": self.served, "fallback": self.fallback}


def _linear(model: nn.Module, name: str) -> nn.Module:
    """The module holding a quantized matrix (an expert slice names a parameter, not a module)."""
    return matrix_by_name(model, name).module


def _why_not_linear(model: nn.Module, name: str, layer: QuantizedLayer) -> str | None:
    matrix = matrix_by_name(model, name)
    module = matrix.module
    if matrix.attr != "weight":
        return "an expert tensor, not a Linear"
    if not isinstance(module, nn.Linear):
        return f"a {type(module).__name__}, not a Linear"
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and module.weight is emb.weight:
        return "tied to the input embedding"
    if layer.outliers is not None:
        return "holds 16-bit outliers (no kernel adds the sparse part)"
    if not isinstance(layer.spec.format, IntFormat):
        return f"{layer.spec.format.name} is not an integer format"
    return None


def plan_kernels(model: nn.Module, layers: Mapping[str, QuantizedLayer], *, backend: str = "auto") -> KernelReport:
    """What ``apply_kernels`` would do, without building anything (runs anywhere)."""
    served: dict[str, str] = {}
    fallback: dict[str, str] = {}
    for name, layer in layers.items():
        why = _why_not_linear(model, name, layer)
        if why is None:
            module = _linear(model, name)
            kernel, why = choose_kernel(layer.spec.format, tuple(module.weight.shape), module.weight.dtype, backend)
            if kernel is not None:
                served[name] = kernel.name
                continue
        fallback[name] = why
    return KernelReport(backend, served, fallback)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def apply_kernels(model: nn.Module, layers: Mapping[str, QuantizedLayer], *, backend: str = "auto",
                  required: bool = False) -> KernelReport:
    """Replace each quantized Linear that a kernel serves by its kernel module, in place.

    ``layers`` is ``quantize_(...).layers``: the solver's codes and parameters are packed
    as they are.  The others keep their fake-quant 16-bit weights and are listed in the
    report; with ``required`` they raise a KernelError instead.  Needs the model on CUDA.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise KernelError(f"low-bit kernels run on CUDA; the model is on {device} "
                          f"({'no CUDA device is visible' if not torch.cuda.is_available() else 'move it with --device cuda'})")
    report = plan_kernels(model, layers, backend=backend)
    if required:
        report.require()
    for name, kernel_name in report.served.items():
        old = _linear(model, name)
        layer = layers[name]
        try:
            new = KERNELS[kernel_name].build(layer.spec.format, layer.qtensor, old.bias, old.weight.dtype, old.weight.device)
        except (ValueError, RuntimeError) as e:
            raise MixqError(f"layer {name!r}: {kernel_name} could not pack {layer.spec.format.name}: {e}") from None
        _set_module(model, name, new)
    return report
