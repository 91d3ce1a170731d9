"""A search space restricted to the choices a serving target runs (``target:`` in the space file).

The one place mixq asks "does this target run this format at this shape" for a search: the kernels'
own checks (``runtime.kernels.serves``) and GGUF's (``export.gguf.row_refusal``).

    target: torchao     # choices a torchao kernel serves (mixq.runtime.kernels: int4 tinygemm, int8)
    target: gemlite     # choices a GemLite kernel serves (1/2/4/8-bit integer, grouped)
    target: gguf        # choices with a GGUF type llama.cpp reads (Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K)

Each unit keeps the choices its target serves on every one of its layers' shapes (a kernel's
alignment rules depend on the shape); the space gets one ``allowed`` rule per unit that loses
some.  A unit left with none is an error that names it, its shapes and the space's choices.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from mixq.errors import PlanError
from mixq.formats import Format, parse_format

TARGETS = ("torchao", "gemlite", "gguf")


def serves(target: str, fmt: Format, shape: tuple[int, int]) -> bool:
    """Whether ``target`` runs a ``[out, in]`` layer of ``shape`` stored in ``fmt``."""
    if target == "gguf":
        from mixq.export.gguf import row_refusal

        return row_refusal(fmt, shape[1]) is None
    if target in ("torchao", "gemlite"):
        from mixq.runtime.kernels import serves as kernel_serves

        return kernel_serves(fmt, shape, target)
    raise PlanError(f"search space: target {target!r} is not one of {', '.join(TARGETS)}")


def restrict(space, model: nn.Module, units: Iterable):  # noqa: ANN001, ANN201 (SearchSpace, Unit: import cycle)
    """``space`` with an ``allowed`` rule for each unit its target does not serve at every choice."""
    import dataclasses

    from mixq.models import matrix_by_name

    if space.target is None:
        return space
    rules = []
    for unit in units:
        shape = {n: matrix_by_name(model, n).shape for n in unit.layers}
        shapes = sorted(set(shape.values()))
        keep = tuple(c for c in space.choices_of(unit.name)  # format_of: a fraction: profile width per layer
                     if all(serves(space.target, parse_format(space.format_of(n, c)), shape[n]) for n in unit.layers))
        if not keep:
            raise PlanError(f"search space: target {space.target} serves none of the choices "
                            f"({', '.join(space.choices_of(unit.name))}) on unit {unit.name} (shapes "
                            f"{', '.join(f'{o}x{i}' for o, i in shapes)})")
        if set(keep) != set(space.choices_of(unit.name)):
            rules.append((unit.name, keep))
    # exact unit names go first: the first matching rule wins (SearchSpace.choices_of)
    return dataclasses.replace(space, allowed=tuple(rules) + tuple(space.allowed))
