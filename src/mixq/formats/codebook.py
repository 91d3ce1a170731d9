"""Formats whose element grid is a finite set of values (minifloat, log, NF).

The element grid is scaled per group in one of three ways:

* ``absmax``: a 16-bit float scale that maps the group's largest magnitude to the
  grid's largest value (the usual per-channel / per-group weight scaling);
* ``pow2``: a shared power-of-two exponent (8 bits, E8M0), as OCP MX formats and block
  minifloat: ``X = 2^(floor(log2(max|v|)) - emax)``, elements saturate (block log
  chooses its exponent otherwise, see ``log.py``);
* ``none``: the raw element grid (fixed exponent bias), as the LLM-Mixed-Q seed.

Rounding is to the nearest grid value; values outside the range saturate to the extreme
values.  A tie (a value exactly halfway between two neighbours) goes to the neighbour of
even rank, the rank of a value being its position among the magnitudes of its sign
(0 has rank 0, the smallest positive value rank 1, ...).  For a minifloat the rank is
the code of the magnitude, so this is round half to even on the mantissa, as IEEE 754
and the OCP MX conversions round; the rule is symmetric in the sign for the other code
books (log, NF) too, and every code book holds 0, so neighbours never share a parity.
Codes are indices into the sorted grid.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from mixq.errors import FormatError
from mixq.formats.base import Format, Params, floor_log2, fp16_round
from mixq.formats.integer import E8M0_MAX, E8M0_MIN

SCALINGS = ("absmax", "pow2", "none")


@functools.cache
def _grid_tensor(values: tuple[float, ...], device: torch.device) -> Tensor:
    """One tensor per grid and device (no host-to-device copy per call; CUDA graphs need that)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.cache
def _midpoints(values: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The midpoints between neighbouring grid values and, per midpoint, whether a tie goes
    to the upper neighbour.  Midpoints of float32 values are exact in float64; they are kept
    in float32 where that is exact too (minifloat and log grids), so rounding stays exact."""
    grid = torch.tensor(values, dtype=torch.float32).double()
    mids = (grid[1:] + grid[:-1]) / 2
    if torch.equal(mids.float().double(), mids):
        mids = mids.float()
    rank = (torch.arange(len(grid)) - int((grid < 0).sum())).abs()  # distance from the index of 0
    up = rank[1:] % 2 == 0
    return mids.to(device), up.to(device)


class CodebookFormat(Format):
    """Base of grid formats; subclasses define ``values()`` and carry a ``scaling`` field."""

    scaling: str

    def values(self) -> tuple[float, ...]:
        """Sorted representable values of one element (unscaled)."""
        raise NotImplementedError

    def _check_scaling(self) -> None:
        if self.scaling not in SCALINGS:
            raise FormatError(f"{self.name}: unknown scaling {self.scaling!r} (one of {', '.join(SCALINGS)})")
        if self.scaling == "pow2" and (self.group_size is None or self.per_tensor):
            raise FormatError(f"{self.name}: a shared-exponent format needs a block size")
        if self.scaling == "none" and (self.group_size is not None or self.per_tensor):
            raise FormatError(f"{self.name}: a raw (unscaled) format has no groups")

    @property
    def requires_whole_groups(self) -> bool:  # type: ignore[override]
        return self.scaling == "pow2"

    @property
    def max_value(self) -> float:
        return max(abs(v) for v in self.values())

    @property
    def emax(self) -> int:
        """Exponent of the largest element value (OCP MX's emax_elem)."""
        return math.floor(math.log2(self.max_value))

    @property
    def group_overhead_bits(self) -> int:
        return {"absmax": 16, "pow2": 8, "none": 0}[self.scaling]

    def grid(self, device: torch.device | None = None) -> Tensor:
        return _grid_tensor(self.values(), torch.device(device) if device is not None else torch.device("cpu"))

    def fit(self, x: Tensor) -> Params:
        x = x.float()
        amax = x.abs().amax(dim=1, keepdim=True)
        if self.scaling == "absmax":
            scale = torch.where(amax > 0, amax / self.max_value, torch.ones_like(amax))
            return {"scale": fp16_round(scale)}
        if self.scaling == "pow2":
            exp = torch.where(amax > 0, self.shared_exponent(amax), torch.zeros_like(amax))
            return {"exp": exp.clamp(E8M0_MIN, E8M0_MAX)}
        return {}

    def shared_exponent(self, amax: Tensor) -> Tensor:
        """Exponent of the power-of-two scale of blocks with largest magnitude ``amax`` (> 0):
        OCP MX's ``floor(log2(amax)) - emax_elem``."""
        return floor_log2(amax) - self.emax

    def _unscale(self, x: Tensor, params: Params) -> Tensor:
        if self.scaling == "absmax":
            return x / params["scale"]
        if self.scaling == "pow2":
            return x * torch.exp2(-params["exp"])
        return x

    def encode(self, x: Tensor, params: Params) -> Tensor:
        values = self.values()
        mids, up = _midpoints(values, x.device)
        u = self._unscale(x.float(), params).to(mids.dtype)
        idx = torch.bucketize(u, mids)  # mids[idx - 1] < u <= mids[idx]: a tie lands on the lower neighbour
        at = idx.clamp(max=len(mids) - 1)
        idx = idx + ((u == mids[at]) & up[at])
        return idx.to(torch.uint8 if len(values) <= 256 else torch.int16)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        v = self.grid(codes.device)[codes.long()]
        if self.scaling == "absmax":
            return v * params["scale"]
        if self.scaling == "pow2":
            return v * torch.exp2(params["exp"])
        return v
