"""The weight cache: fake-quantized weights per (layer, choice), computed once; a trial only swaps them in."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixq.formats import parse_format
from mixq.models import each_matrix, matrix_by_name
from mixq.search.space import SearchSpace, Unit


class WeightCache:
    """Fake-quantized weights per (layer, choice), computed once; a trial only swaps them in.

    Kept on the model's device. Only data-free solvers (RTN) are cached; calibrated
    solvers are applied to the final plan (see the report).  ``pinned`` layers (the space's
    fixed ones) take their format in every trial.
    """

    def __init__(self, model: nn.Module, layers: list[str], pinned: dict[str, str] | None = None,
                 format_of: Callable[[str, str], str] | None = None) -> None:
        self.model = model
        self.pinned = dict(pinned or {})
        self.format_of = format_of  # (layer, choice) -> format name (``SearchSpace.format_of``); None: the choice
        self.matrices = {n: matrix_by_name(model, n) for n in [*layers, *self.pinned]}
        self.original = {n: m.get().detach().clone() for n, m in self.matrices.items()}
        self.cache: dict[tuple[str, str], Tensor] = {}

    def weight(self, layer: str, choice: str) -> Tensor:
        key = (layer, choice)
        if key not in self.cache:
            w = self.original[layer]
            fmt = choice if self.format_of is None else self.format_of(layer, choice)
            self.cache[key] = each_matrix(w, parse_format(fmt).fake_quantize).to(w.dtype)
        return self.cache[key]

    @torch.no_grad()
    def apply(self, units: list[Unit], assignment: dict[str, str]) -> None:
        for u in units:
            for layer in u.layers:
                self.matrices[layer].set(self.weight(layer, assignment[u.name]))
        for layer, choice in self.pinned.items():
            self.matrices[layer].set(self.weight(layer, choice))

    @torch.no_grad()
    def restore(self) -> None:
        for n, w in self.original.items():
            self.matrices[n].set(w)

    @classmethod
    def for_space(cls, model: nn.Module, space: SearchSpace, units: list[Unit]) -> WeightCache:
        """The cache of a space's searched layers, its fixed layers pinned to their formats."""
        from mixq.plan import Plan

        searched = [n for u in units for n in u.layers]
        fixed = Plan(space.fixed).resolve(model) if space.fixed else {}
        return cls(model, searched, {n: spec.format.name for n, spec in fixed.items() if n not in searched},
                   space.format_of)


__all__ = ["WeightCache"]
