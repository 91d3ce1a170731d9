"""A layer's weight as the quantizers see it (``[out, in]``), and the exact bits a spec stores for it.

The search's cache, the layer database and measured sensitivity read and write searched
weights through ``read_weight`` and ``write_weight``: the ``Matrix`` of ``models`` (a Linear,
a Conv1D stored ``[in, out]``, stacked experts ``[E, out, in]``) in its ``[out, in]`` orientation.
"""

from __future__ import annotations

from torch import Tensor, nn

from mixq.models import matrix_by_name
from mixq.plan import stored_bits


def read_weight(model: nn.Module, name: str) -> Tensor:
    """The weight of matrix ``name`` as ``[out, in]`` (``[E, out, in]`` for stacked experts): the
    parameter's data where it is stored that way, else a copy."""
    return matrix_by_name(model, name).get().data


def write_weight(model: nn.Module, name: str, value: Tensor) -> None:
    """Copy ``value`` (``[out, in]``) into the weight of matrix ``name``, in place."""
    matrix_by_name(model, name).set(value)


__all__ = ["read_weight", "stored_bits", "write_weight"]
