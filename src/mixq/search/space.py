"""The search space: which layers are searched, at what granularity, among which choices.

    granularity: block          # layer | block | shared | model
    choices: [int3-g64, int4-g128:gptq, int4-g32, int8]
    solver: rtn                 # the solver of the choices that name none
    options: {}                 # its options
    include: []                 # layer names / re: patterns searched (default: every Linear)
    fixed:                      # layers pinned to a spec, not searched
      - {match: "re:model\\.layers\\.0\\..*", format: int8}
    tied: [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]   # fused by serving engines
    allowed:                    # units searched among fewer of the choices (e.g. from a seed file)
      - {match: model.layers.3, choices: [int4-g128, int8]}
    target: torchao             # only the choices a serving target runs: torchao | gemlite | gguf

A *choice* is a format, a format and a solver (``int4-g128:gptq``), or a format, a solver and
its options (``int3-g128:quantease:outliers=0.01``, or the mapping ``{format: int3-g128,
solver: quantease, options: {outliers: 0.01}}``); its name is that text, canonical.  Choices
whose solver needs calibration (GPTQ, QuantEase) are searched on a layer database.

A *unit* is what one search parameter sets: one layer (or one tied group of layers) of
one block, a whole block, one layer kind shared by every block, or the whole model.

Units restricted by ``allowed`` are searched over the shared ``choices`` like any other:
a proposal giving a unit a choice it does not allow is projected onto the allowed choice
nearest in cost (``size.project``) before it is checked and scored.

``fraction: profile`` (with ``profile: PATH``, a ``mixq profile`` file): the choices are
fixed-point widths (``fxp8``) and every layer takes ``fxp{W}-f{F}`` with its own fraction
width ``F = W − 1 − ceil(log2 max|w|)`` from the profile (``mixq.profile.fraction_format``).

``target`` keeps, for each unit, the choices its target's kernels serve on the unit's shapes
(``search.target.restrict``, applied once the model is known: it adds ``allowed`` rules).

Tied groups (vLLM fuses q/k/v and gate/up and wants one scheme per fused group) are the
default; ``tied: []`` searches every layer on its own (which serving engines may refuse).
"""

from __future__ import annotations

import dataclasses
import functools
import re
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
FRACTION_RULES = ("profile",)
_WIDTH = re.compile(r"fxp(\d+)")  # a fixed-point width of a fraction: profile space


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
    allowed: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (unit name or re: pattern, its choices)
    fraction: str | None = None  # "profile": choices are fixed-point widths, fractions from the profile
    profile: str | None = None  # the profile file of fraction: profile
    profile_absmax: tuple[tuple[str, float], ...] = ()  # max |w| per layer, read from it
    options: tuple[tuple[str, Any], ...] = ()  # options of ``solver`` for the choices that name none
    target: str | None = None  # torchao | gemlite | gguf: only choices that target serves (search.target)

    def __post_init__(self) -> None:
        from mixq.search.target import TARGETS

        if self.target is not None and self.target not in TARGETS:
            raise PlanError(f"search space: target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"search space: granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.choices:
            raise PlanError("search space: no choices")
        if self.fraction is not None and self.fraction not in FRACTION_RULES:
            raise PlanError(f"search space: fraction {self.fraction!r} is not one of {', '.join(FRACTION_RULES)}")
        if self.fraction is None:
            specs = [self.spec(c) for c in self.choices]
        else:  # a width names no format alone: the formats are checked per layer
            bad = [c for c in self.choices if not _WIDTH.fullmatch(c)]
            if bad:
                raise PlanError(f"search space: with fraction: {self.fraction} the choices are fixed-point widths "
                                f"(fxp4, fxp8 ...), got {bad[0]!r}")
            specs = [self.cost_spec(c) for c in self.choices]
        if len(set(self.choices)) != len(self.choices) or len(set(specs)) != len(specs):
            raise PlanError("search space: duplicate choices")
        for m, allowed in self.allowed:
            if not allowed or not set(allowed) <= set(self.choices):
                raise PlanError(f"search space: allowed {m!r}: its choices {list(allowed)} must be some of the "
                                f"space's ({', '.join(self.choices)})")

    def spec(self, choice: str) -> LayerSpec:
        """The format, solver and options a choice stands for (under fraction: profile a width
        has a format per layer: see ``spec_of``)."""
        if self.fraction is not None and _WIDTH.fullmatch(choice):
            raise PlanError(f"choice {choice!r} is a fixed-point width: its format depends on the layer (spec_of)")
        return _spec(choice, self.solver, self.options)

    def spec_of(self, layer: str, choice: str) -> LayerSpec:
        """What ``layer`` gets for ``choice``: the choice's spec, with the layer's own fixed-point
        format under fraction: profile."""
        if self.fraction is not None and _WIDTH.fullmatch(choice):
            return LayerSpec.of(self.format_of(layer, choice), self.solver, **dict(self.options))
        return self.spec(choice)

    def cost_spec(self, choice: str) -> LayerSpec:
        """A spec that costs what the choice costs on any layer (``cost_format``'s format)."""
        if self.fraction is not None and _WIDTH.fullmatch(choice):
            return LayerSpec.of(self.cost_format(choice), self.solver, **dict(self.options))
        return self.spec(choice)

    def needs_calibration(self) -> bool:
        """Whether a choice or a fixed layer has a solver that needs calibration data (a layer database)."""
        from mixq.solvers import get_solver

        specs = [self.cost_spec(c) for c in self.choices] + [s for _, s in self.fixed]
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
        if self.allowed:  # written only when used: older studies' spaces read back unchanged
            d["allowed"] = [{"match": m, "choices": list(c)} for m, c in self.allowed]
        if self.fraction is not None:
            d.update({"fraction": self.fraction, "profile": self.profile})
        if self.options:
            d["options"] = dict(self.options)
        if self.target is not None:
            d["target"] = self.target
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        if not isinstance(d, dict):
            raise PlanError("a search space is a mapping (granularity, choices, ...)")
        unknown = set(d) - {"granularity", "choices", "solver", "options", "include", "fixed", "tied", "allowed",
                            "fraction", "profile", "target"}
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
        for key in ("granularity", "solver", "fraction", "profile", "target"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise PlanError(f"search space: {key!r} must be a string, got {d[key]!r}")
        options = d.get("options") or {}
        if not isinstance(options, dict):
            raise PlanError(f"search space: 'options' must be a mapping of solver options, got {options!r}")
        solver = str(d.get("solver", "rtn"))
        fraction = d.get("fraction")
        name = (lambda c: str(c).lower()) if fraction is not None else (lambda c: choice_name(c, solver, options))
        allowed = []
        for i, r in enumerate(_list_of(d, "allowed", "mappings with 'match' and 'choices'")):
            if not isinstance(r, dict) or "match" not in r or not isinstance(r.get("choices"), list):
                raise PlanError(f"search space: allowed[{i}] must be a mapping with 'match' (a unit name or 're:' "
                                f"pattern) and 'choices' (a list), got {r!r}")
            allowed.append((str(r["match"]), tuple(name(c) for c in r["choices"])))
        space = cls(choices=tuple(name(c) for c in choices), granularity=str(d.get("granularity", "block")),
                    solver=solver, include=tuple(map(str, _list_of(d, "include", "layer names or 're:' patterns"))),
                    fixed=tuple(fixed), tied=tuple(tuple(t) for t in tied), allowed=tuple(allowed), fraction=fraction,
                    options=tuple(sorted(options.items())), target=d.get("target"))
        return space.with_profile(d["profile"]) if d.get("profile") is not None else space

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        return cls.from_dict(read_yaml(path, "search space") or {})

    def with_profile(self, path: str | Path) -> SearchSpace:
        """The space with the layers' max |w| read from a profile (``mixq profile``)."""
        from mixq.profile import read_absmax

        if self.fraction is None:
            raise PlanError("a profile sets fraction widths: the search space needs fraction: profile")
        return dataclasses.replace(self, profile=str(path), profile_absmax=tuple(sorted(read_absmax(path).items())))

    # -- choices ----------------------------------------------------------------
    def choices_of(self, unit: str) -> tuple[str, ...]:
        """The choices a unit may take: its ``allowed`` rule's (the first that matches), else all."""
        return next((c for m, c in self.allowed if matches(m, unit)), self.choices)

    def format_of(self, layer: str, choice: str) -> str:
        """The format a layer takes for a choice: the choice's, or under fraction: profile a
        fixed-point width's ``fxp{W}-f{F}`` with the layer's fraction width."""
        width = _WIDTH.fullmatch(choice) if self.fraction is not None else None
        if width is None:
            return self.spec(choice).format.name
        from mixq.profile import fraction_format

        if not self.profile_absmax:
            raise PlanError("search space: fraction: profile needs a profile (profile: PATH in the space, or --profile)")
        absmax = dict(self.profile_absmax)
        if layer not in absmax:
            raise PlanError(f"the profile {self.profile} has no layer {layer!r} (made for another model?)")
        return fraction_format(layer, int(width.group(1)), absmax[layer])

    def cost_format(self, choice: str) -> str:
        """A format that costs what the choice costs: itself, or for a fixed-point width W
        ``fxp{W}-f0`` (no stored scale: every fraction width costs W bits per weight)."""
        width = _WIDTH.fullmatch(choice) if self.fraction is not None else None
        return self.spec(choice).format.name if width is None else f"fxp{width.group(1)}-f0"

    def uniform(self, choice: str, units: list[Unit]) -> Plan:
        """Every layer at one choice: ``Plan.uniform``, or for a fixed-point width the space's plan
        with every unit at that width (a fraction width per layer)."""
        if self.fraction is not None and _WIDTH.fullmatch(choice):
            return self.plan(units, {u.name: choice for u in units})
        return Plan(default=self.spec(choice))

    # -- units ------------------------------------------------------------------
    def units(self, model: nn.Module) -> list[Unit]:
        from mixq.models import quantizable_matrices, transformer_blocks

        prefix, blocks = transformer_blocks(model)
        names = [n for n in quantizable_matrices(model)
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
        out = {}
        for u in units:
            picks = []
            for n in u.layers:
                if n not in specs:
                    continue
                s = specs[n]
                allowed = self.choices_of(u.name)
                c = next((c for c in allowed if self.spec_of(n, c) == s), None)
                same = [c for c in allowed if self.spec_of(n, c).format == s.format]
                if c is None and len(same) == 1:
                    c = same[0]  # the format is a choice's: the solver comes from the space
                if c is None:
                    raise PlanError(f"initial plan gives {n!r} {s.format.name} ({s.solver}), not a choice of the "
                                    f"space ({', '.join(allowed)})")
                picks.append(c)
            if not picks:
                raise PlanError(f"initial plan leaves {u.name!r} unquantized; the search needs a choice for it")
            out[u.name] = max(set(picks), key=lambda c: (picks.count(c), stored_bits(self.cost_spec(c), (4096, 4096))))
        return out

    def plan(self, units: list[Unit], assignment: dict[str, str]) -> Plan:
        """The plan that gives every layer of each unit the unit's choice."""
        rules = list(self.fixed)
        for u in units:
            rules += [(layer, self.spec_of(layer, assignment[u.name])) for layer in u.layers]
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

