"""The first seed's Ax files: its parameter space and its initial samples, read into mixq's
block-granularity search and written back from a study.

Parameter space (``--space params.json``): per transformer block a bit width and a group
size, each fixed or chosen, over half-open block ranges::

    {"parameters": [
      {"name": "bitwidth", "name_format": "bitwidth.{i}.",
       "layers": [{"range": [0, 3], "type": "fixed", "value": 5},
                  {"range": [3, 30], "type": "choice", "values": [2, 3, 4, 5, 6, 8]}]},
      {"name": "groupsize", "name_format": "groupsize.{i}.",
       "layers": [{"range": [0, 3], "type": "fixed", "value": 32},
                  {"range": [3, 30], "type": "choice", "values": [32, 64, 128, 256]}]}]}

Initial samples (``--initial samples.json``): ``{"initial_samples": [{"bitwidth.0.": 5,
"groupsize.0.": 32, ...}, ...]}``, every block's two values by the ``name_format`` keys.

The seed quantizes with torchao's asymmetric integer formats (a zero point per group), so
block ``i`` with bit width ``b`` and group size ``g`` takes ``int{b}-g{g}`` on all its Linear
layers.  A block whose two parameters are fixed becomes a ``fixed`` rule of the space; the
others are block units whose choices are the product of their bit widths and group sizes.
The space's ``choices`` are the union over the blocks; a block that allows fewer gets an
``allowed`` rule (see ``space``).  Written back, consecutive blocks with equal values share
one range and a one-value choice is written as fixed.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mixq.errors import FormatError, PlanError
from mixq.plan import LayerSpec, Plan, read_yaml
from mixq.search.config import Start
from mixq.search.space import SearchSpace, Unit

PARAMETERS = ("bitwidth", "groupsize")
NAME_FORMATS = {"bitwidth": "bitwidth.{i}.", "groupsize": "groupsize.{i}."}  # the seed's keys
AX_KEYS = {"value_type", "is_ordered", "sort_values"}  # Ax's parameter options: accepted, not used
SPACE_FILE, SAMPLES_FILE = "parameters.json", "initial_samples.json"


@dataclass(frozen=True)
class Entry:
    """One ``layers`` item: blocks ``start`` to ``end - 1`` take one of ``values`` (one value: fixed)."""

    start: int
    end: int
    values: tuple[int, ...]
    fixed: bool

    def describe(self) -> str:
        return f"range [{self.start}, {self.end}]"

    def to_dict(self) -> dict[str, Any]:
        if self.fixed:
            return {"range": [self.start, self.end], "type": "fixed", "value": self.values[0]}
        return {"range": [self.start, self.end], "type": "choice", "values": list(self.values)}


@dataclass(frozen=True)
class Parameter:
    name: str
    name_format: str
    layers: tuple[Entry, ...]

    def per_block(self, blocks: int) -> list[tuple[int, ...]]:
        """The values of every block ``0 .. blocks - 1``; a range past the model's blocks, or a
        block in no range, is an error naming it."""
        out: list[tuple[int, ...] | None] = [None] * blocks
        for e in self.layers:
            if e.end > blocks:
                raise PlanError(f"seed space: {self.name} {e.describe()} reaches past the model's {blocks} blocks "
                                f"(0 to {blocks - 1}; ranges are half-open)")
            for i in range(e.start, e.end):
                out[i] = e.values
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            raise PlanError(f"seed space: {self.name}: block(s) {_spans(missing)} are in no range")
        return out  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "name_format": self.name_format, "layers": [e.to_dict() for e in self.layers]}


@dataclass(frozen=True)
class SeedSpace:
    """The seed's parameter space: a bit width and a group size per block."""

    bitwidth: Parameter
    groupsize: Parameter

    @classmethod
    def from_dict(cls, d: Any) -> SeedSpace:
        if not isinstance(d, dict) or not isinstance(d.get("parameters"), list):
            raise PlanError("seed space: expected {\"parameters\": [...]}")
        params = {}
        for i, p in enumerate(d["parameters"]):
            if not isinstance(p, dict) or p.get("name") not in PARAMETERS:
                raise PlanError(f"seed space: parameters[{i}] must be a mapping named one of {', '.join(PARAMETERS)}, "
                                f"got {p!r}")
            if p["name"] in params:
                raise PlanError(f"seed space: parameter {p['name']!r} is given twice")
            params[p["name"]] = _parameter(p)
        missing = [n for n in PARAMETERS if n not in params]
        if missing:
            raise PlanError(f"seed space: no {' and no '.join(missing)} parameter")
        return cls(params["bitwidth"], params["groupsize"])

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": [self.bitwidth.to_dict(), self.groupsize.to_dict()]}

    def blocks(self, count: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(bit widths, group sizes) of each of ``count`` blocks."""
        return list(zip(self.bitwidth.per_block(count), self.groupsize.per_block(count)))

    @classmethod
    def of_blocks(cls, blocks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> SeedSpace:
        """The file of per-block values, with consecutive equal blocks in one range."""
        params = []
        for k, name in enumerate(PARAMETERS):
            entries = []
            for values, run in itertools.groupby(enumerate(b[k] for b in blocks), key=lambda x: x[1]):
                idx = [i for i, _ in run]
                entries.append(Entry(idx[0], idx[-1] + 1, values, len(values) == 1))
            params.append(Parameter(name, NAME_FORMATS[name], tuple(entries)))
        return cls(*params)

    def to_search_space(self, prefix: str, count: int, *, solver: str = "rtn") -> SearchSpace:
        """The block-granularity space of a model whose ``count`` blocks are named ``{prefix}.{i}``."""
        fixed, allowed = [], {}
        for i, (bits, groups) in enumerate(self.blocks(count)):
            names = tuple(int_format(b, g) for b in bits for g in groups)
            if len(names) == 1:
                fixed.append((f"re:{re.escape(prefix)}\\.{i}\\..+", LayerSpec.of(names[0], solver)))
            else:
                allowed[f"{prefix}.{i}"] = names
        if not allowed:
            raise PlanError("seed space: every block is fixed: nothing to search")
        choices = sorted({n for names in allowed.values() for n in names}, key=_bits_and_group)
        restricted = tuple((u, names) for u, names in allowed.items() if set(names) != set(choices))
        return SearchSpace(choices=tuple(choices), granularity="block", solver=solver, fixed=tuple(fixed),
                           allowed=restricted)


def _parameter(p: dict[str, Any]) -> Parameter:
    name = p["name"]
    unknown = set(p) - {"name", "name_format", "layers"}
    if unknown:
        raise PlanError(f"seed space: {name}: unknown key(s) {', '.join(sorted(unknown))}")
    fmt = p.get("name_format", NAME_FORMATS[name])
    if not isinstance(fmt, str) or "{i}" not in fmt:
        raise PlanError(f"seed space: {name}: name_format must be a string with {{i}} (e.g. {NAME_FORMATS[name]!r}), "
                        f"got {fmt!r}")
    if not isinstance(p.get("layers"), list) or not p["layers"]:
        raise PlanError(f"seed space: {name}: 'layers' must be a non-empty list of ranges")
    entries = [_entry(name, e) for e in p["layers"]]
    for a, b in itertools.combinations(entries, 2):
        if a.start < b.end and b.start < a.end:
            raise PlanError(f"seed space: {name} {a.describe()} overlaps {b.describe()} "
                            f"(blocks {max(a.start, b.start)} to {min(a.end, b.end) - 1})")
    return Parameter(name, fmt, tuple(sorted(entries, key=lambda e: e.start)))


def _entry(name: str, e: Any) -> Entry:
    if not isinstance(e, dict):
        raise PlanError(f"seed space: {name}: a range is a mapping with 'range' and 'type', got {e!r}")
    r = e.get("range")
    if (not isinstance(r, list) or len(r) != 2 or not all(_is_int(x) for x in r)) or not 0 <= r[0] < r[1]:
        raise PlanError(f"seed space: {name}: 'range' must be [start, end] with 0 <= start < end, got {r!r}")
    where = f"{name} range {r}"
    unknown = set(e) - {"range", "type", "value", "values"} - AX_KEYS
    if unknown:
        raise PlanError(f"seed space: {where}: unknown key(s) {', '.join(sorted(unknown))}")
    if e.get("type") == "fixed":
        values = [e.get("value")]
    elif e.get("type") == "choice":
        values = e.get("values")
        if not isinstance(values, list) or not values:
            raise PlanError(f"seed space: {where}: a choice needs a non-empty 'values' list")
    else:
        raise PlanError(f"seed space: {where}: 'type' must be 'fixed' or 'choice', got {e.get('type')!r}")
    if not all(_is_int(v) and v > 0 for v in values) or len(set(values)) != len(values):
        raise PlanError(f"seed space: {where}: values must be distinct positive integers, got {values!r}")
    for v in values:  # a bit width or group size mixq cannot store is refused now, by its format's error
        if name == "bitwidth":
            int_format(v, 32)
        else:
            int_format(4, v)
    return Entry(r[0], r[1], tuple(sorted(values)), e["type"] == "fixed")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _spans(idx: list[int]) -> str:
    """``[3, 4, 5, 9]`` as ``3-5, 9``."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def int_format(bits: int, group: int) -> str:
    """The seed's asymmetric ``bits``-bit format with groups of ``group``: ``int{bits}-g{group}``."""
    from mixq.formats import IntFormat

    try:
        return IntFormat(bits, "asym", group).name
    except FormatError as e:
        raise PlanError(f"seed space: bit width {bits}, group size {group}: {e}") from None


def _bits_and_group(name: str) -> tuple[int, int]:
    """(bit width, group size) of an ``int{b}-g{g}`` format; any other is an error."""
    from mixq.formats import IntFormat, parse_format

    f = parse_format(name)
    if not isinstance(f, IntFormat) or f.scheme != "asym" or f.group_size is None or f.per_tensor:
        raise PlanError(f"{name}: the seed files hold asymmetric integer formats with groups (int{{b}}-g{{g}})")
    return f.bits, f.group_size


# -- a study's space and plans, block by block ---------------------------------------------
@dataclass(frozen=True)
class Block:
    unit: str | None  # the unit that searches this block, or None: the block is fixed
    formats: tuple[str, ...]  # its choices (one: its fixed format)
    bits: tuple[int, ...]  # the bit widths and group sizes of which ``formats`` is the product
    groups: tuple[int, ...]


def blocks_of(space: SearchSpace, model: nn.Module) -> list[Block]:
    """Every transformer block as the seed files see it; a space they cannot hold (not per
    block, a block partly fixed, formats other than int{b}-g{g}) is an error."""
    from mixq.models import quantizable_matrices, transformer_blocks

    if space.granularity != "block" or space.fraction is not None:
        raise PlanError(f"the seed files hold one bit width and group size per block; this space searches "
                        f"{space.granularity} units" + (" with fraction: profile" if space.fraction else ""))
    prefix, modules = transformer_blocks(model)
    units = {u.name: u for u in space.units(model)}
    outside = [u for u in units if not re.fullmatch(rf"{re.escape(prefix)}\.\d+", u)]
    if outside:
        raise PlanError(f"the seed files hold transformer blocks only; the space also searches {outside[0]!r}")
    fixed = Plan(space.fixed).resolve(model) if space.fixed else {}
    linears = list(quantizable_matrices(model))
    blocks = []
    for i in range(len(modules)):
        layers = [n for n in linears if n.startswith(f"{prefix}.{i}.")]
        unit = units.get(f"{prefix}.{i}")
        if unit is not None and set(unit.layers) == set(layers):
            name, formats = unit.name, space.choices_of(unit.name)
        else:
            fixed_formats = {fixed[n].format.name for n in layers if n in fixed}
            if unit is not None or len(fixed_formats) != 1 or any(n not in fixed for n in layers):
                raise PlanError(f"block {i}: the seed files give a block one format for all its layers, fixed or "
                                "searched; this space searches or fixes only some of them")
            name, formats = None, tuple(fixed_formats)
        pairs = {_bits_and_group(f) for f in formats}
        bits, groups = tuple(sorted({p[0] for p in pairs})), tuple(sorted({p[1] for p in pairs}))
        if len(pairs) != len(bits) * len(groups):
            raise PlanError(f"block {i}: its choices {', '.join(formats)} are not every bit width with every group "
                            "size, as a seed file's block is")
        blocks.append(Block(name, formats, bits, groups))
    return blocks


def seed_space_of(space: SearchSpace, model: nn.Module) -> SeedSpace:
    """The seed parameter space of a (block-granularity, integer) search space."""
    return SeedSpace.of_blocks([(b.bits, b.groups) for b in blocks_of(space, model)])


def samples_of(space: SearchSpace, model: nn.Module, assignments: list[dict[str, str]]) -> dict[str, Any]:
    """``{"initial_samples": [...]}``: each assignment as the seed's keys, every block's two values."""
    blocks = blocks_of(space, model)
    samples = []
    for a in assignments:
        sample: dict[str, int] = {}
        for i, b in enumerate(blocks):
            bits, group = _bits_and_group(b.formats[0] if b.unit is None else a[b.unit])
            sample[NAME_FORMATS["bitwidth"].format(i=i)] = bits
            sample[NAME_FORMATS["groupsize"].format(i=i)] = group
        samples.append(sample)
    return {"initial_samples": samples}


def read_samples(path: str | Path, space: SearchSpace, model: nn.Module, *,
                 names: dict[str, str] = NAME_FORMATS) -> list[Start]:
    """The starts of an initial-samples file (keys by ``names``, the parameters' name formats)."""
    data = _json(path)
    samples = data.get("initial_samples") if isinstance(data, dict) else None
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise PlanError(f"{path}: expected {{\"initial_samples\": [{{\"bitwidth.0.\": 5, ...}}, ...]}}")
    blocks = blocks_of(space, model)
    keys = {names[p].format(i=i) for i in range(len(blocks)) for p in PARAMETERS}
    starts = []
    for k, sample in enumerate(samples):
        where = f"{path}: initial sample {k}"
        unknown = [key for key in sample if key not in keys]
        if unknown:
            raise PlanError(f"{where}: {unknown[0]!r} names no block of the model's {len(blocks)} "
                            f"(keys are {names['bitwidth']!r} and {names['groupsize']!r})")
        assignment = {}
        for i, b in enumerate(blocks):
            kb, kg = names["bitwidth"].format(i=i), names["groupsize"].format(i=i)
            if b.unit is None:
                given = (sample.get(kb), sample.get(kg))
                want = (b.bits[0], b.groups[0])
                if any(v is not None and v != w for v, w in zip(given, want)):
                    raise PlanError(f"{where}: block {i} is fixed at {b.formats[0]}, the sample gives {given}")
                continue
            if kb not in sample or kg not in sample:
                raise PlanError(f"{where}: no {kb!r} and {kg!r} for searched block {i}")
            fmt = int_format(sample[kb], sample[kg]) if _is_int(sample[kb]) and _is_int(sample[kg]) else None
            if fmt not in b.formats:
                raise PlanError(f"{where}: block {i}: bit width {sample[kb]!r}, group size {sample[kg]!r} is not one "
                                f"of the block's choices ({', '.join(b.formats)})")
            assignment[b.unit] = fmt
        starts.append(Start(f"seed sample {k} ({Path(path).name})", assignment))
    return starts


# -- the command's hooks ---------------------------------------------------------------------
def _json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None


def read_space(path: str | None) -> SearchSpace | SeedSpace:
    """``--space``: a mixq space (YAML/JSON), or a seed parameter-space file (bound to a model's
    blocks by ``bind_space``); none: the default space."""
    if path is None:
        return SearchSpace()
    data = read_yaml(path, "search space")
    if isinstance(data, dict) and "parameters" in data:
        return SeedSpace.from_dict(data)
    return SearchSpace.from_dict(data or {})


def bind_space(space: SearchSpace | SeedSpace, model: nn.Module) -> SearchSpace:
    """The search space of ``read_space``'s result for this model (a seed file: over its blocks)."""
    from mixq.models import transformer_blocks

    if isinstance(space, SearchSpace):
        return space
    prefix, blocks = transformer_blocks(model)
    return space.to_search_space(prefix, len(blocks))


def initial_starts(path: str, space: SearchSpace, units: list[Unit], model: nn.Module,
                   given: SearchSpace | SeedSpace) -> list[Start]:
    """``--initial``: a seed initial-samples file (its starts), or a plan (one start)."""
    if Path(path).suffix == ".json" and Path(path).is_file():
        data = _json(path)
        if isinstance(data, dict) and "initial_samples" in data:
            names = NAME_FORMATS if isinstance(given, SearchSpace) else \
                {"bitwidth": given.bitwidth.name_format, "groupsize": given.groupsize.name_format}
            return read_samples(path, space, model, names=names)
    return [Start(f"plan {path}", space.assignment_of(units, Plan.parse(path), model))]


def export_seed_files(out: str | Path, space: SearchSpace, model: nn.Module,
                      assignments: list[dict[str, str]]) -> list[Path]:
    """``--export-seed-files DIR``: the space and the plans (best first) as the seed's two files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / SPACE_FILE, out / SAMPLES_FILE]
    files[0].write_text(json.dumps(seed_space_of(space, model).to_dict(), indent=2) + "\n")
    files[1].write_text(json.dumps(samples_of(space, model, assignments), indent=2) + "\n")
    return files


__all__ = ["Entry", "Parameter", "SeedSpace", "bind_space", "blocks_of", "export_seed_files", "initial_starts",
           "int_format", "read_samples", "read_space", "samples_of", "seed_space_of"]
