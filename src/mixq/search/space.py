"""The search space: which layers are searched, at what granularity, among which choices.

    granularity: block          # layer | block | shared | model
    choices: [int3-g64, int4-g128:gptq, int4-g32, int8]
    solver: rtn                 # the solver of the choices that name none
    options: {}                 # its options
    include: []                 # layer names / re: patterns searched (default: every Linear)
    fixed:                      # layers pinned to a spec, not searched
      - {match: "re:model\\.layers\\.0\\..*", format: int8}
    tied: [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]   # fused by serving engines

A *choice* is a format, a format and a solver (``int4-g128:gptq``), or a format, a solver and
its options (``int3-g128:quantease:outliers=0.01``, or the mapping ``{format: int3-g128,
solver: quantease, options: {outliers: 0.01}}``); its name is that text, canonical.  Choices
whose solver needs calibration (GPTQ, QuantEase) are searched on a layer database.

A *unit* is what one search parameter sets: one layer (or one tied group of layers) of
one block, a whole block, one layer kind shared by every block, or the whole model.
Tied groups (vLLM fuses q/k/v and gate/up and wants one scheme per fused group) are the
default; ``tied: []`` searches every layer on its own (which serving engines may refuse).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from mixq.errors import MixqError, PlanError
from mixq.layers import stored_bits
from mixq.plan import LayerSpec, Plan, matches, read_yaml

GRANULARITIES = ("layer", "block", "shared", "model")
DEFAULT_CHOICES = ("int2-g64", "int3-g128", "int3-g64", "int3-g32", "int4-g128", "int4-g32", "int5-g128", "int6-g128", "int8")
DEFAULT_TIED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]


def parse_choice(choice: str | Mapping[str, Any], solver: str = "rtn", options: Mapping[str, Any] | None = None) -> LayerSpec:
    """The spec a choice stands for: ``format``, ``format:solver`` or ``format:solver:key=value,...``
    (or a mapping with ``format``, ``solver``, ``options``); ``solver`` and ``options`` serve a
    choice that names no solver."""
    where = f"search space choice {choice!r}"
    if isinstance(choice, Mapping):
        d = dict(choice)
        if "solver" not in d:
            d = {**d, "solver": solver, "options": {**(options or {}), **(d.get("options") or {})}}
        return LayerSpec.from_dict(d, where)
    if not isinstance(choice, str):
        raise PlanError(f"{where}: expected a format name (e.g. int4-g128, int3-g64:quantease)")
    parts = choice.split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise PlanError(f"{where}: expected FORMAT, FORMAT:SOLVER or FORMAT:SOLVER:KEY=VALUE,...")
    if len(parts) == 1:
        return LayerSpec.from_dict({"format": parts[0].strip(), "solver": solver, "options": dict(options or {})}, where)
    opts: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in (parts[2].split(",") if len(parts) == 3 else []))):
        if "=" not in item:
            raise PlanError(f"{where}: option {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        opts[key.strip()] = yaml.safe_load(value)
    return LayerSpec.from_dict({"format": parts[0].strip(), "solver": parts[1].strip(), "options": opts}, where)


def choice_name(choice: str | Mapping[str, Any], solver: str = "rtn", options: Mapping[str, Any] | None = None) -> str:
    """The canonical name of a choice: the format's canonical name, then ``:solver`` and
    ``:key=value,...`` (sorted) where the choice names them."""
    spec = parse_choice(choice, solver, options)
    named = (":" in choice) if isinstance(choice, str) else "solver" in choice
    if not named:
        return spec.format.name
    opts = ",".join(f"{k}={_yaml_scalar(v)}" for k, v in spec.options)
    return f"{spec.format.name}:{spec.solver}" + (f":{opts}" if opts else "")


@functools.lru_cache(maxsize=4096)  # every trial builds its plan from the choices' specs
def _spec(choice: str, solver: str, options: tuple[tuple[str, Any], ...]) -> LayerSpec:
    return parse_choice(choice, solver, dict(options))


def _yaml_scalar(value: Any) -> str:
    """A value as YAML reads it back (``1e-05`` would come back a string; ``1.0e-05`` a float)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...").strip()


@dataclass(frozen=True)
class SearchSpace:
    choices: tuple[str, ...] = DEFAULT_CHOICES
    granularity: str = "block"
    solver: str = "rtn"
    include: tuple[str, ...] = ()
    fixed: tuple[tuple[str, LayerSpec], ...] = ()
    tied: tuple[tuple[str, ...], ...] = DEFAULT_TIED
    options: tuple[tuple[str, Any], ...] = ()  # options of ``solver`` for the choices that name none

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"search space: granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.choices:
            raise PlanError("search space: no choices")
        specs = [self.spec(c) for c in self.choices]
        if len(set(self.choices)) != len(self.choices) or len(set(specs)) != len(specs):
            raise PlanError("search space: duplicate choices")

    def spec(self, choice: str) -> LayerSpec:
        """The format, solver and options a choice stands for."""
        return _spec(choice, self.solver, self.options)

    def needs_calibration(self) -> bool:
        """Whether a choice or a fixed layer has a solver that needs calibration data (a layer database)."""
        from mixq.solvers import get_solver

        specs = [self.spec(c) for c in self.choices] + [s for _, s in self.fixed]
        return any(get_solver(s.solver).needs_calibration for s in specs)

    def with_solver(self, solver: str | None, options: Mapping[str, Any] | None = None) -> SearchSpace:
        """The same space with another solver (and options) for the choices that name none;
        ``options`` alone replace the options of the space's solver."""
        if solver is None and not options:
            return self
        try:
            return dataclasses.replace(self, solver=solver or self.solver, options=tuple(sorted((options or {}).items())))
        except MixqError as e:
            raise PlanError(f"--solver {solver or self.solver}: {e}") from None

    # -- serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"granularity": self.granularity, "choices": list(self.choices), "solver": self.solver,
             "include": list(self.include), "fixed": [{"match": m, **s.to_dict()} for m, s in self.fixed],
             "tied": [list(t) for t in self.tied]}
        if self.options:
            d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        if not isinstance(d, dict):
            raise PlanError("a search space is a mapping (granularity, choices, ...)")
        unknown = set(d) - {"granularity", "choices", "solver", "options", "include", "fixed", "tied"}
        if unknown:
            raise PlanError(f"search space: unknown key(s) {', '.join(sorted(unknown))}")
        fixed = []
        for i, r in enumerate(_list_of(d, "fixed", "mappings with 'match' and 'format'")):
            if not isinstance(r, dict) or "match" not in r:
                raise PlanError(f"search space: fixed[{i}] must be a mapping with 'match' (a layer name or 're:' "
                                f"pattern) and 'format', got {r!r}")
            fixed.append((str(r["match"]), LayerSpec.from_dict(r, f"fixed {r['match']!r}")))
        choices = _list_of(d, "choices", "format names (or format:solver, or mappings with 'format')",
                           default=list(DEFAULT_CHOICES))
        tied = _list_of(d, "tied", "lists of layer names", default=[list(t) for t in DEFAULT_TIED])
        for i, t in enumerate(tied):
            if not isinstance(t, list) or not all(isinstance(x, str) for x in t):
                raise PlanError(f"search space: tied[{i}] must be a list of layer names (e.g. [q_proj, k_proj, v_proj]), "
                                f"got {t!r}")
        for key in ("granularity", "solver"):
            if key in d and not isinstance(d[key], str):
                raise PlanError(f"search space: {key!r} must be a string, got {d[key]!r}")
        options = d.get("options") or {}
        if not isinstance(options, dict):
            raise PlanError(f"search space: 'options' must be a mapping of solver options, got {options!r}")
        solver = str(d.get("solver", "rtn"))
        return cls(tuple(choice_name(c, solver, options) for c in choices),
                   str(d.get("granularity", "block")), solver,
                   tuple(map(str, _list_of(d, "include", "layer names or 're:' patterns"))), tuple(fixed),
                   tuple(tuple(t) for t in tied), tuple(sorted(options.items())))

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        return cls.from_dict(read_yaml(path, "search space") or {})

    # -- units ------------------------------------------------------------------
    def units(self, model: nn.Module) -> list[Unit]:
        from mixq.models import quantizable_layers, transformer_blocks

        prefix, blocks = transformer_blocks(model)
        names = [n for n in quantizable_layers(model)
                 if not any(matches(m, n) for m, _ in self.fixed)
                 and (not self.include or any(matches(p, n) for p in self.include))]
        if not names:
            raise PlanError("the search space holds no layer (check include/fixed)")
        units: dict[str, list[str]] = {}
        for n in names:
            block, suffix = None, n
            for i in range(len(blocks)):
                if n.startswith(f"{prefix}.{i}."):
                    block, suffix = i, n[len(f"{prefix}.{i}.") :]
                    break
            leaf = suffix.rsplit(".", 1)[-1]
            group = next((t for t in self.tied if leaf in t), None)
            kind = suffix if group is None else suffix[: len(suffix) - len(leaf)] + "+".join(group)
            if block is None:
                key = n
            elif self.granularity == "layer":
                key = f"{prefix}.{block}.{kind}"
            elif self.granularity == "block":
                key = f"{prefix}.{block}"
            elif self.granularity == "shared":
                key = kind
            else:
                key = "model"
            units.setdefault(key, []).append(n)
        return [Unit(k, tuple(v)) for k, v in units.items()]

    def assignment_of(self, units: list[Unit], plan: Plan, model: nn.Module) -> dict[str, str]:
        """A plan projected onto the units: each unit takes its layers' most common spec
        (ties: the larger one), which must be a choice's spec, or at least its format one
        choice's format."""
        specs = plan.resolve(model)
        by_spec = {self.spec(c): c for c in self.choices}
        by_format: dict[str, list[str]] = {}
        for c in self.choices:
            by_format.setdefault(self.spec(c).format.name, []).append(c)
        out = {}
        for u in units:
            found = [specs[n] for n in u.layers if n in specs]
            if not found:
                raise PlanError(f"initial plan leaves {u.name!r} unquantized; the search needs a choice for it")
            pick = max(set(found), key=lambda s: (found.count(s), stored_bits(s, (4096, 4096))))
            same_format = by_format.get(pick.format.name, [])
            if pick in by_spec:
                out[u.name] = by_spec[pick]
            elif len(same_format) == 1:
                out[u.name] = same_format[0]
            else:
                raise PlanError(f"initial plan gives {u.name!r} {pick.format.name} ({pick.solver}), not a choice of the "
                                f"space ({', '.join(self.choices)})")
        return out

    def plan(self, units: list[Unit], assignment: dict[str, str]) -> Plan:
        """The plan that gives every layer of each unit the unit's choice."""
        rules = list(self.fixed)
        for u in units:
            spec = self.spec(assignment[u.name])
            rules += [(layer, spec) for layer in u.layers]
        return Plan(tuple(rules))


def _list_of(d: dict[str, Any], key: str, what: str, default: list[Any] | None = None) -> list[Any]:
    """``d[key]`` as a list (absent: ``default``, else empty); null, a string or a mapping is refused by name."""
    if key not in d:
        return [] if default is None else default
    value = d[key]
    if not isinstance(value, list):
        raise PlanError(f"search space: {key!r} must be a list of {what}, got {type(value).__name__} {value!r}")
    if key == "include" and not all(isinstance(x, str) for x in value):
        raise PlanError(f"search space: {key!r} must be a list of {what}, got {value!r}")
    if key == "choices" and not all(isinstance(x, (str, dict)) for x in value):
        raise PlanError(f"search space: {key!r} must be a list of {what}, got {value!r}")
    return value

