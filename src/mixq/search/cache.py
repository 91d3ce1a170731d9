"""The weight cache: the solved weight of every (layer, choice), found once; a trial only copies them in."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mixq.database import DatabaseError, LayerDatabase
from mixq.database.store import describe
from mixq.errors import MixqError
from mixq.layers import read_weight, write_weight
from mixq.models import each_matrix, matrix_by_name, transformer_blocks
from mixq.plan import LayerSpec
from mixq.search.space import SearchSpace, Unit
from mixq.solvers import get_solver

DEVICE_SHARE = 0.5  # of the device memory free when the cache is made: what its weights may take (the rest: activations)


class WeightCache:
    """Solved weights per (layer, choice); a trial copies them into the model (``apply``).

    With a layer ``database`` every layer inside the transformer blocks takes the database's
    solution (solved on the base model's calibration inputs; GPTQ, QuantEase, ... or RTN);
    without one, and for layers outside the blocks, only data-free solvers (RTN) are possible and
    their solution is computed here.  Up to ``device_bytes`` of weights stay on the model's device
    (least recently used dropped first: ``None`` keeps all; default on CUDA: ``DEVICE_SHARE`` of
    the free memory); the others are read again from the database's memory-mapped shards, or
    re-solved.  ``spec_of(layer, choice)`` gives a layer's spec at a choice; ``pinned`` layers (the space's fixed
    ones) take their spec in every trial.
    """

    def __init__(self, model: nn.Module, layers: list[str], choices: Sequence[str],
                 spec_of: Callable[[str, str], LayerSpec], pinned: Mapping[str, LayerSpec] | None = None, *,
                 database: LayerDatabase | None = None, device_bytes: int | None = None) -> None:
        self.model = model
        self.choices = tuple(choices)
        self.spec_of = spec_of  # (layer, choice) -> spec: ``SearchSpace.spec_of``
        self.pinned = dict(pinned or {})
        self.database = database
        self.original = {n: read_weight(model, n).clone() for n in dict.fromkeys([*layers, *self.pinned])}
        prefix = transformer_blocks(model)[0] + "."
        # a database holds the 2-D matrices inside the blocks; stacked experts are solved here (data-free)
        self.from_database = {n for n in self.original if database is not None and n.startswith(prefix)
                              and not matrix_by_name(model, n).stacked}
        needed = [(n, spec_of(n, c)) for n in layers for c in self.choices] + list(self.pinned.items())
        for layer, spec in needed:
            if layer not in self.from_database and get_solver(spec.solver).needs_calibration:
                where = ("is outside the transformer blocks (a layer database holds the layers inside them)"
                         if database is not None else
                         "needs calibration data: give a layer database (mixq search --db DIR, built from --nsamples "
                         "calibration windows; or mixq database build)")
                raise MixqError(f"layer {layer!r}, choice {describe(spec)}: solver {spec.solver!r} {where}")
        if database is not None:
            missing = database.missing((n, s) for n, s in needed if n in self.from_database)
            if missing:
                layer, spec = missing[0]
                raise DatabaseError(f"layer database {database.path} lacks {len(missing)} of the entries this search reads "
                                    f"(e.g. {layer!r} at {describe(spec)}): build them first (mixq database build, or "
                                    "mixq search, which builds what is missing)")
        if device_bytes is None:
            device_bytes = default_device_bytes(next(iter(self.original.values())).device) if self.original else None
        self.device_bytes = device_bytes
        self.cache: OrderedDict[tuple[str, LayerSpec], Tensor] = OrderedDict()
        self.bytes = 0

    def weight(self, layer: str, choice: str | LayerSpec) -> Tensor:
        """The solved weight of ``layer`` at ``choice`` (a choice name or a spec), on the model's device."""
        spec = self.spec_of(layer, choice) if isinstance(choice, str) else choice
        key = (layer, spec)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        w = self.original[layer]
        if layer in self.from_database:
            value = self.database.weight(layer, spec).to(w.device, w.dtype)  # type: ignore[union-attr]
        else:
            solver = get_solver(spec.solver)
            options = solver.options(spec.opts)
            value = each_matrix(w, lambda m: solver(m, spec.format, None, options).weight).to(w.dtype)
        size = value.numel() * value.element_size()
        while self.cache and self.device_bytes is not None and self.bytes + size > self.device_bytes:
            _, old = self.cache.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        if self.device_bytes is None or size <= self.device_bytes:
            self.cache[key] = value
            self.bytes += size
        return value

    @torch.no_grad()
    def apply(self, units: list[Unit], assignment: dict[str, str]) -> None:
        """Copy each unit's weights at its choice, and the pinned layers', into the model."""
        for u in units:
            for layer in u.layers:
                write_weight(self.model, layer, self.weight(layer, assignment[u.name]))
        for layer, spec in self.pinned.items():
            write_weight(self.model, layer, self.weight(layer, spec))

    @torch.no_grad()
    def restore(self) -> None:
        for n, w in self.original.items():
            write_weight(self.model, n, w)

    @classmethod
    def for_space(cls, model: nn.Module, space: SearchSpace, units: list[Unit], *,
                  database: LayerDatabase | None = None, device_bytes: int | None = None) -> WeightCache:
        """The cache of a space's searched layers, its fixed layers pinned to their specs."""
        searched = [n for u in units for n in u.layers]
        return cls(model, searched, space.choices, space.spec_of, pinned_layers(model, space, searched),
                   database=database, device_bytes=device_bytes)


def pinned_layers(model: nn.Module, space: SearchSpace, searched: list[str]) -> dict[str, LayerSpec]:
    """The space's fixed layers that are not searched, with their specs."""
    from mixq.plan import Plan

    fixed = Plan(space.fixed).resolve(model) if space.fixed else {}
    return {n: spec for n, spec in fixed.items() if n not in searched}


def database_entries(model: nn.Module, space: SearchSpace, units: list[Unit]) -> list[tuple[str, LayerSpec]]:
    """The (layer, spec) pairs a search of ``space`` reads from a layer database: every searched
    layer at every choice, and the pinned layers inside the transformer blocks at theirs."""
    prefix = transformer_blocks(model)[0] + "."
    searched = [n for u in units for n in u.layers]
    pairs = [(n, space.spec_of(n, c)) for n in searched for c in space.choices
             if not matrix_by_name(model, n).stacked]
    return pairs + [(n, s) for n, s in pinned_layers(model, space, searched).items() if n.startswith(prefix)]


def default_device_bytes(device: torch.device) -> int | None:
    """What the cache may keep on ``device``: ``DEVICE_SHARE`` of its free memory on CUDA, all of it elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_SHARE)


__all__ = ["DEVICE_SHARE", "WeightCache", "database_entries", "default_device_bytes", "pinned_layers"]
