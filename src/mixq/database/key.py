"""What a layer database's entries depend on: its key, and the id of one (layer, spec) entry.

The key names the model (the hash of its weights), the dtype the solutions are stored in, the
calibration set (dataset, split, windows and their hash, the batch size the Grams were summed
in) and the mixq version.  A database opened with another key is refused, naming what differs.
An entry's id hashes its layer, format, solver and every option of the solver (defaults
spelt out, so ``gptq`` and ``gptq`` with ``damp=0.01`` are one entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mixq.errors import MixqError
from mixq.plan import LayerSpec

KEY_VERSION = 1  # layout of the key; a database of another layout is refused


class DatabaseError(MixqError):
    """A layer database that cannot be used: another key, a failed write, missing entries."""


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration windows the Grams were taken on, and how they were summed."""

    dataset: str
    split: str
    nsamples: int
    seqlen: int
    seed: int
    windows_sha256: str  # mixq.data.tensor_sha256 of the token windows
    batch_size: int  # windows per forward pass: the order the Grams were summed in

    def flags(self) -> str:
        """The command-line options that draw these windows and sum the Grams the same way."""
        return (f"--calib-dataset {self.dataset} --calib-split {self.split} --nsamples {self.nsamples} "
                f"--seqlen {self.seqlen} --seed {self.seed} --batch-size {self.batch_size}")


@dataclass(frozen=True)
class DatabaseKey:
    model_sha256: str
    dtype: str  # the model's dtype: solutions are stored in it, the Grams come from its forward pass
    calibration: CalibrationSet
    mixq_version: str

    @classmethod
    def of(cls, model_sha256: str, dtype: str, calibration: CalibrationSet) -> DatabaseKey:
        """The key for this mixq version."""
        from mixq import __version__

        return cls(model_sha256, dtype, calibration, __version__)

    def to_dict(self) -> dict[str, Any]:
        return {"version": KEY_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatabaseKey:
        if not isinstance(d, dict) or d.get("version") != KEY_VERSION:
            raise DatabaseError(f"layer database key of an unknown layout (version {d.get('version') if isinstance(d, dict) else d!r}, "
                                f"this mixq reads {KEY_VERSION})")
        try:
            return cls(d["model_sha256"], d["dtype"], CalibrationSet(**d["calibration"]), d["mixq_version"])
        except (KeyError, TypeError) as e:
            raise DatabaseError(f"layer database key is malformed ({e})") from None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: DatabaseKey) -> list[str]:
        """What differs from ``other``, in words (``this`` value first)."""
        out = []
        if self.model_sha256 != other.model_sha256:
            out.append(f"another model (weights sha256 {self.model_sha256[:12]}…, not {other.model_sha256[:12]}…)")
        if self.dtype != other.dtype:
            out.append(f"dtype {self.dtype}, not {other.dtype}")
        if self.mixq_version != other.mixq_version:
            out.append(f"mixq {self.mixq_version}, not {other.mixq_version}")
        mine, theirs = dataclasses.asdict(self.calibration), dataclasses.asdict(other.calibration)
        for field, value in mine.items():
            if value != theirs[field]:
                shown = (lambda v: f"{v[:12]}…") if field == "windows_sha256" else repr
                out.append(f"calibration {field} {shown(value)}, not {shown(theirs[field])}")
        return out


def solver_options(spec: LayerSpec) -> dict[str, Any]:
    """Every option of the spec's solver, defaults included."""
    from mixq.solvers import get_solver

    solver = get_solver(spec.solver)
    return dataclasses.asdict(solver.options(spec.opts))


def entry_id(layer: str, spec: LayerSpec) -> str:
    """The id of (layer, spec) in a database: a hash of the layer, format, solver and full options."""
    text = json.dumps({"layer": layer, "format": spec.format.name, "solver": spec.solver, "options": solver_options(spec)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]  # 128 bits: no collision among any database's entries


__all__ = ["CalibrationSet", "DatabaseError", "DatabaseKey", "entry_id", "solver_options"]
