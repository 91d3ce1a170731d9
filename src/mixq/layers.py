"""A layer's weight as the quantizers see it (``[out, in]``), and the exact bits a spec stores for it.

Every module that reads or writes a searched layer's weight goes through ``read_weight`` and
``write_weight``, so that one place changes when layers other than ``nn.Linear`` (GPT-2's Conv1D,
mixture-of-experts tensors) are addressed the same way.
"""

from __future__ import annotations

from torch import Tensor, nn

from mixq.plan import LayerSpec


def read_weight(model: nn.Module, name: str) -> Tensor:
    """The weight of layer ``name`` (the parameter's data, not a copy)."""
    return model.get_submodule(name).weight.data


def write_weight(model: nn.Module, name: str, value: Tensor) -> None:
    """Copy ``value`` into the weight of layer ``name`` (in place: the parameter stays the same tensor)."""
    model.get_submodule(name).weight.data.copy_(value)


def stored_bits(spec: LayerSpec, shape: tuple[int, int]) -> int:
    """Bits stored for a weight of ``shape`` under ``spec``: codes and group parameters (the format) plus
    what the solver keeps beside them (16-bit outliers, kept columns); the count ``Plan.size_report`` makes."""
    from mixq.solvers import get_solver

    solver = get_solver(spec.solver)
    return spec.format.storage_bits(shape) + solver.extra_bits(solver.options(spec.opts), shape)


__all__ = ["read_weight", "stored_bits", "write_weight"]
