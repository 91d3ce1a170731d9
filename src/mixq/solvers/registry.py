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
    weight: Tensor  # dequantised weight (codes + outliers), float32, same shape as the input
    loss: float | None = None  # layer objective tr((W-Ŵ) H (W-Ŵ)ᵀ) when a Gram is given
    outliers: Tensor | None = None  # sparse part kept in 16 bits: weight = dequantize(qtensor) + outliers


def no_extra_bits(options: Any, shape: tuple[int, int]) -> int:
    return 0


@dataclass(frozen=True)
class Solver:
    name: str
    fn: Callable[[Tensor, Format, Tensor | None, Any], SolveResult]
    options_type: type
    needs_calibration: bool
    extra_bits: Callable[[Any, tuple[int, int]], int] = no_extra_bits  # stored beside the codes (outliers)

    def options(self, values: Mapping[str, Any]) -> Any:
        """Build the options dataclass, naming any unknown key."""
        known = {f.name for f in dataclasses.fields(self.options_type)}
        unknown = sorted(set(values) - known)
        if "outliers" in unknown:
            with_outliers = [n for n, s in _SOLVERS.items() if "outliers" in {f.name for f in dataclasses.fields(s.options_type)}]
            raise PlanError(f"solver {self.name!r} keeps no outliers (solvers that do: {', '.join(with_outliers)})")
        if unknown:
            raise PlanError(
                f"solver {self.name!r} has no option {', '.join(map(repr, unknown))} "
                f"(options: {', '.join(sorted(known)) or 'none'})"
            )
        try:
            return self.options_type(**values)
        except TypeError as e:
            raise PlanError(f"solver {self.name!r}: bad options {dict(values)}: {e}") from None

    def __call__(self, weight: Tensor, fmt: Format, gram: Tensor | None, options: Any) -> SolveResult:
        return self.fn(weight, fmt, gram, options)


_SOLVERS: dict[str, Solver] = {}


def register_solver(name: str, options_type: type, *, needs_calibration: bool,
                    extra_bits: Callable[[Any, tuple[int, int]], int] = no_extra_bits) -> Callable:
    def deco(fn: Callable) -> Callable:
        if name in _SOLVERS:
            raise ValueError(f"solver {name!r} registered twice")
        _SOLVERS[name] = Solver(name, fn, options_type, needs_calibration, extra_bits)
        return fn

    return deco


def get_solver(name: str) -> Solver:
    if name not in _SOLVERS:
        raise PlanError(f"unknown solver {name!r} (available: {', '.join(solver_names())})")
    return _SOLVERS[name]


def solver_names() -> list[str]:
    return sorted(_SOLVERS)
