"""Column-wise access to a format's groups, for solvers that quantize one column at a time.

A ``ColumnGrid`` fixes the parameters (scales, zero points, exponents) of every group of
a weight and rounds any column onto its group's grid.  Groups are the format's: per
tensor, per row, or ``g`` consecutive columns of a row with a shorter last group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.formats import Format, QTensor
from mixq.formats.base import Params


@dataclass
class ColumnGrid:
    fmt: Format
    cols: int
    width: int  # columns per group
    params: list[Params | None]  # per group, [rows or 1, 1] tensors; None until fitted

    @classmethod
    def of(cls, fmt: Format, cols: int) -> ColumnGrid:
        width = cols if fmt.per_tensor else fmt.group_width(cols)
        return cls(fmt, cols, width, [None] * -(-cols // width))

    def group_of(self, col: int) -> int:
        return col // self.width

    def span(self, group: int) -> tuple[int, int]:
        return group * self.width, min((group + 1) * self.width, self.cols)

    def fit(self, group: int, w: Tensor) -> None:
        """Fit one group's parameters on its columns ``w`` ([rows, k]; per tensor: the whole weight)."""
        self.params[group] = self.fmt.fit(w.reshape(1, -1) if self.fmt.per_tensor else w)

    def fit_all(self, weight: Tensor) -> None:
        for g in range(len(self.params)):
            a, b = self.span(g)
            self.fit(g, weight if self.fmt.per_tensor else weight[:, a:b])

    def round(self, col: int, w: Tensor) -> Tensor:
        """Round column ``col`` (values ``w``, [rows]) onto its group's grid."""
        g = self.group_of(col)
        p = self.params[g]
        assert p is not None, "group parameters must be fitted before rounding"
        return self.fmt.round(w.unsqueeze(1), self.fmt.column_params(p, col - self.span(g)[0])).squeeze(1)

    def stacked(self, rows: int) -> Params:
        """Per-group parameters as stored: [rows, groups] each (per tensor: [1, 1])."""
        assert all(p is not None for p in self.params), "every group must be fitted"
        if self.fmt.per_tensor:
            return dict(self.params[0])  # type: ignore[arg-type]
        return {k: torch.cat([p[k].expand(rows, 1) for p in self.params], dim=1) for k in self.params[0]}  # type: ignore[index, union-attr]

    def qtensor(self, weight: Tensor) -> QTensor:
        """Codes of ``weight`` on the fitted grid (values off the grid are rounded), with parameters."""
        params = self.stacked(weight.shape[0])
        expanded = self.fmt.expand(QTensor(self.fmt.name, weight, params, self.width))
        return QTensor(self.fmt.name, self.fmt.encode(weight, expanded), params, self.width)

    def round_all(self, weight: Tensor) -> Tensor:
        """Round a whole weight onto the fitted grid."""
        return self.fmt.dequantize(self.qtensor(weight))
