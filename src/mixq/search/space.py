"""The search space: which layers are searched, at what granularity, among which choices.

    granularity: block          # layer | block | shared | model
    choices: [int3-g64, int4-g128, int4-g32, int8]
    solver: rtn
    include: []                 # layer names / re: patterns searched (default: every Linear)
    fixed:                      # layers pinned to a spec, not searched
      - {match: "re:model\\.layers\\.0\\..*", format: int8}
    tied: [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]   # fused by serving engines

A *unit* is what one search parameter sets: one layer (or one tied group of layers) of
one block, a whole block, one layer kind shared by every block, or the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mixq.errors import PlanError
from mixq.formats import parse_format
from mixq.plan import LayerSpec, Plan, matches, read_yaml

GRANULARITIES = ("layer", "block", "shared", "model")
DEFAULT_CHOICES = ("int2-g64", "int3-g128", "int3-g64", "int3-g32", "int4-g128", "int4-g32", "int5-g128", "int6-g128", "int8")
DEFAULT_TIED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    choices: tuple[str, ...] = DEFAULT_CHOICES
    granularity: str = "block"
    solver: str = "rtn"
    include: tuple[str, ...] = ()
    fixed: tuple[tuple[str, LayerSpec], ...] = ()
    tied: tuple[tuple[str, ...], ...] = DEFAULT_TIED

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"search space: granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.choices:
            raise PlanError("search space: no choices")
        for c in self.choices:
            LayerSpec.from_dict({"format": c, "solver": self.solver}, f"search space choice {c!r}")
        if len(set(self.choices)) != len(self.choices):
            raise PlanError("search space: duplicate choices")

    # -- serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "choices": list(self.choices), "solver": self.solver,
                "include": list(self.include), "fixed": [{"match": m, **s.to_dict()} for m, s in self.fixed],
                "tied": [list(t) for t in self.tied]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        if not isinstance(d, dict):
            raise PlanError("a search space is a mapping (granularity, choices, ...)")
        unknown = set(d) - {"granularity", "choices", "solver", "include", "fixed", "tied"}
        if unknown:
            raise PlanError(f"search space: unknown key(s) {', '.join(sorted(unknown))}")
        fixed = []
        for i, r in enumerate(_list_of(d, "fixed", "mappings with 'match' and 'format'")):
            if not isinstance(r, dict) or "match" not in r:
                raise PlanError(f"search space: fixed[{i}] must be a mapping with 'match' (a layer name or 're:' "
                                f"pattern) and 'format', got {r!r}")
            fixed.append((str(r["match"]), LayerSpec.from_dict(r, f"fixed {r['match']!r}")))
        choices = _list_of(d, "choices", "format names", default=list(DEFAULT_CHOICES))
        tied = _list_of(d, "tied", "lists of layer names", default=[list(t) for t in DEFAULT_TIED])
        for i, t in enumerate(tied):
            if not isinstance(t, list) or not all(isinstance(x, str) for x in t):
                raise PlanError(f"search space: tied[{i}] must be a list of layer names (e.g. [q_proj, k_proj, v_proj]), "
                                f"got {t!r}")
        for key in ("granularity", "solver"):
            if key in d and not isinstance(d[key], str):
                raise PlanError(f"search space: {key!r} must be a string, got {d[key]!r}")
        return cls(tuple(str(parse_format(c).name) for c in choices),
                   str(d.get("granularity", "block")), str(d.get("solver", "rtn")),
                   tuple(map(str, _list_of(d, "include", "layer names or 're:' patterns"))), tuple(fixed),
                   tuple(tuple(t) for t in tied))

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        return cls.from_dict(read_yaml(path, "search space") or {})

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
        """A plan projected onto the units: each unit takes its layers' most common format
        (ties: the larger one), which must be one of the choices."""
        specs = plan.resolve(model)
        out = {}
        for u in units:
            fmts = [specs[n].format.name for n in u.layers if n in specs]
            if not fmts:
                raise PlanError(f"initial plan leaves {u.name!r} unquantized; the search needs a choice for it")
            pick = max(set(fmts), key=lambda f: (fmts.count(f), parse_format(f).bits_per_weight((4096, 4096))))
            if pick not in self.choices:
                raise PlanError(f"initial plan gives {u.name!r} {pick}, not a choice of the space ({', '.join(self.choices)})")
            out[u.name] = pick
        return out

    def plan(self, units: list[Unit], assignment: dict[str, str]) -> Plan:
        """The plan that gives every layer of each unit the unit's choice."""
        rules = list(self.fixed)
        for u in units:
            spec = LayerSpec.of(assignment[u.name], self.solver)
            rules += [(layer, spec) for layer in u.layers]
        return Plan(tuple(rules))


def _list_of(d: dict[str, Any], key: str, what: str, default: list[Any] | None = None) -> list[Any]:
    """``d[key]`` as a list (absent: ``default``, else empty); null, a string or a mapping is refused by name."""
    if key not in d:
        return [] if default is None else default
    value = d[key]
    if not isinstance(value, list):
        raise PlanError(f"search space: {key!r} must be a list of {what}, got {type(value).__name__} {value!r}")
    if key in ("choices", "include") and not all(isinstance(x, str) for x in value):
        raise PlanError(f"search space: {key!r} must be a list of {what}, got {value!r}")
    return value

