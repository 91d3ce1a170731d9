"""Solver registry. A solver is a pure function plus a frozen dataclass of its options:

    solve(weight, fmt, gram, options) -> SolveResult

``weight`` is ``[out, in]``; ``gram`` is the input Gram matrix ``[in, in]`` (mean of
XᵀX over calibration tokens) for calibrated solvers, ``None`` for data-free ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mixq.errors import PlanError
from mixq.formats import Format, QTensor


@dataclass(frozen=True)
class SolveResult:
    qtensor: QTensor
    weight: Tensor  # dequantised weight, float32, same shape as the input
    loss: float | None = None  # layer objective tr((W-Ŵ) H (W-Ŵ)ᵀ) when a Gram is given


@dataclass(frozen=True)
class Solver:
    name: str
    fn: Callable[[Tensor, Format, Tensor | None, Any], SolveResult]
    options_type: type
    needs_calibration: bool

    def options(self, values: Mapping[str, Any]) -> Any:
        """Build the options dataclass, naming any unknown key."""
        known = {f.name for f in dataclasses.fields(self.options_type)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PlanError(
                f"solver {self.name!r} has no option {', '.join(map(repr, unknown))} "
                f"(options: {', '.join(sorted(known)) or 'none'})"
            )
        return self.options_type(**values)

    def __call__(self, weight: Tensor, fmt: Format, gram: Tensor | None, options: Any) -> SolveResult:
        return self.fn(weight, fmt, gram, options)


_SOLVERS: dict[str, Solver] = {}


def register_solver(name: str, options_type: type, *, needs_calibration: bool) -> Callable:
    def deco(fn: Callable) -> Callable:
        if name in _SOLVERS:
            raise ValueError(f"solver {name!r} registered twice")
        _SOLVERS[name] = Solver(name, fn, options_type, needs_calibration)
        return fn

    return deco


def get_solver(name: str) -> Solver:
    if name not in _SOLVERS:
        raise PlanError(f"unknown solver {name!r} (available: {', '.join(solver_names())})")
    return _SOLVERS[name]


def solver_names() -> list[str]:
    return sorted(_SOLVERS)
