"""Plans: which layer gets which format and solver, and what the result weighs.

A plan is a list of rules (fully-qualified name, or ``re:`` + a regex matched against
the whole name; first match wins), a default spec for the remaining layers (Linear and
Conv1D weights and stacked experts inside the transformer blocks) and a skip list.  The
embedding, lm_head, heads outside the blocks and MoE routers are quantized only when a
rule names them; tied tensors (lm_head sharing the embedding) take one spec and are stored
once.  An expert tensor (``model.layers.0.mlp.experts.gate_up_proj``, ``[E, out, in]``)
takes one spec and is stored as E matrices.

    default: {format: int4-g128, solver: rtn}
    rules:
      - {match: "re:.*\\.mlp\\.down_proj", format: int8}
    skip: ["model.layers.0.self_attn.q_proj"]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from mixq.errors import MixqError, PlanError
from mixq.formats import Format, parse_format

PLAN_VERSION = 1
STORED_BITS = 16  # unquantized tensors are counted at the 16-bit dtype they are saved in


@dataclass(frozen=True)
class LayerSpec:
    format: Format
    solver: str = "rtn"
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, fmt: str | Format, solver: str = "rtn", **options: Any) -> LayerSpec:
        return cls(parse_format(fmt), solver, tuple(sorted(options.items())))

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format.name, "solver": self.solver, "options": self.opts}

    @classmethod
    def from_dict(cls, d: str | Mapping[str, Any], where: str = "spec") -> LayerSpec:
        if isinstance(d, str):
            d = {"format": d}
        if not isinstance(d, Mapping) or "format" not in d:
            raise PlanError(f"{where}: expected a format name or a mapping with 'format', got {d!r}")
        extra = set(d) - {"format", "solver", "options", "match"}
        if extra:
            raise PlanError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise PlanError(f"{where}: 'options' must be a mapping")
        try:
            spec = cls.of(d["format"], str(d.get("solver", "rtn")), **options)
        except MixqError as e:
            raise PlanError(f"{where}: {e}") from None
        from mixq.solvers import get_solver  # solvers import plans' formats, not plans

        get_solver(spec.solver).options(spec.opts)  # names a bad solver or option now
        return spec


@dataclass(frozen=True)
class SizeReport:
    """What a plan stores for a model, counted exactly."""

    quantized_weights: int  # elements of quantized tensors
    quantized_bits: int  # their codes, every scale, zero point and shared exponent, and outliers
    other_params: int  # elements of every other parameter (norms, biases, embeddings...)
    other_bits: int  # counted at 16 bits each
    layers: int  # quantized tensors (a tied pair counts once)

    @property
    def bits_per_weight(self) -> float:
        """Average over quantized tensors, all overheads included (16.0 when none)."""
        return self.quantized_bits / self.quantized_weights if self.quantized_weights else float(STORED_BITS)

    @property
    def size_bytes(self) -> int:
        return math.ceil((self.quantized_bits + self.other_bits) / 8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits_per_weight": self.bits_per_weight,
            "size_bytes": self.size_bytes,
            "quantized_layers": self.layers,
            "quantized_weights": self.quantized_weights,
            "quantized_bits": self.quantized_bits,
            "other_params": self.other_params,
            "other_bits": self.other_bits,
            "counted": "quantized tensors: codes + scales/zero points/exponents + 16-bit outliers with their indices; "
            f"every other parameter at {STORED_BITS} bits; tied tensors once",
        }


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


@dataclass(frozen=True)
class Plan:
    rules: tuple[tuple[str, LayerSpec], ...] = ()
    default: LayerSpec | None = None
    skip: tuple[str, ...] = ()

    # -- construction -----------------------------------------------------------
    @classmethod
    def uniform(cls, fmt: str | Format, solver: str = "rtn", **options: Any) -> Plan:
        return cls(default=LayerSpec.of(fmt, solver, **options))

    @classmethod
    def preset(cls, name: str) -> Plan:
        """``base``/``fp16``/``none``: nothing quantized; any format name: that format everywhere."""
        if name.strip().lower() in ("base", "fp16", "bf16", "none"):
            return cls()
        return cls.uniform(name)

    @classmethod
    def per_layer(cls, specs: Mapping[str, LayerSpec], default: LayerSpec | None = None) -> Plan:
        """One spec per fully-qualified layer name."""
        return cls(tuple(specs.items()), default)

    @classmethod
    def per_block(cls, specs: Iterable[LayerSpec], prefix: str, default: LayerSpec | None = None) -> Plan:
        """One spec per transformer block ``{prefix}.{i}`` (e.g. ``model.layers``)."""
        rules = tuple((f"re:{re.escape(prefix)}\\.{i}\\..+", s) for i, s in enumerate(specs))
        return cls(rules, default)

    @classmethod
    def shared(cls, specs: Mapping[str, LayerSpec], default: LayerSpec | None = None) -> Plan:
        """One spec per layer suffix (``self_attn.q_proj``), shared by every block."""
        return cls(tuple((f"re:.*\\.{re.escape(k)}", s) for k, s in specs.items()), default)

    def with_solver(self, solver: str | None = None, options: Mapping[str, Any] | None = None) -> Plan:
        """The same layers and formats with another solver and/or extra solver options everywhere."""
        if solver is None and not options:
            return self

        def swap(spec: LayerSpec) -> LayerSpec:
            keep = spec.opts if solver in (None, spec.solver) else {}
            d = {"format": spec.format.name, "solver": solver or spec.solver, "options": {**keep, **(options or {})}}
            return LayerSpec.from_dict(d, f"--solver {d['solver']}")

        return Plan(tuple((m, swap(s)) for m, s in self.rules), None if self.default is None else swap(self.default), self.skip)

    @property
    def is_base(self) -> bool:
        """Nothing to quantize by design (``base``): no rule and no default."""
        return not self.rules and self.default is None

    def needs_calibration(self) -> bool:
        from mixq.solvers import get_solver

        specs = [s for _, s in self.rules] + ([self.default] if self.default else [])
        return any(get_solver(s.solver).needs_calibration for s in specs)

    # -- serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "default": None if self.default is None else self.default.to_dict(),
            "rules": [{"match": m, **s.to_dict()} for m, s in self.rules],
            "skip": list(self.skip),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan is a mapping with 'default', 'rules' and 'skip', got {type(d).__name__}")
        unknown = set(d) - {"version", "default", "rules", "skip"}
        if unknown:
            raise PlanError(f"plan: unknown key(s) {', '.join(sorted(unknown))}")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise PlanError(f"plan: version {d['version']} is not supported (this mixq reads {PLAN_VERSION})")
        rules_in = d.get("rules") or []
        if not isinstance(rules_in, list):
            raise PlanError("plan: 'rules' must be a list")
        rules = []
        for i, r in enumerate(rules_in):
            if not isinstance(r, Mapping) or "match" not in r:
                raise PlanError(f"plan: rule {i} needs a 'match' (a layer name or 're:' regex)")
            rules.append((str(r["match"]), LayerSpec.from_dict(r, f"rule {i} ({r['match']})")))
        for m, _ in rules:
            _check_pattern(m)
        default = d.get("default")
        skip = d.get("skip") or []
        if not isinstance(skip, list):
            raise PlanError("plan: 'skip' must be a list of layer names or 're:' patterns")
        for s in skip:
            _check_pattern(str(s))
        return cls(tuple(rules), None if default is None else LayerSpec.from_dict(default, "default"), tuple(map(str, skip)))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml()
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(read_yaml(path, "plan") or {})

    @classmethod
    def parse(cls, text: str) -> Plan:
        """A plan file path, or a preset name (``int4-g128``, ``base``...)."""
        if Path(text).suffix in (".yaml", ".yml", ".json") or Path(text).is_file():
            return cls.load(text)
        try:
            return cls.preset(text)
        except MixqError as e:
            raise PlanError(f"--plan {text!r} is neither a plan file nor a preset: {e}") from None

    # -- applying to a model ----------------------------------------------------
    def resolve(self, model: nn.Module) -> dict[str, LayerSpec]:
        """Quantized tensors in model order: the first name of each (tied) weight -> spec.

        A name is a module's (Linear, Conv1D, embedding, router) or a stacked expert
        parameter's path (``model.layers.0.mlp.experts.gate_up_proj``): one spec for all its experts.
        """
        from mixq.models import candidate_matrices

        default, extras = candidate_matrices(model)
        names = list(default) + [n for n in extras if n not in default]
        for pattern in [m for m, _ in self.rules] + list(self.skip):
            if not any(matches(pattern, n) for n in names):
                raise PlanError(f"plan names no existing layer: {pattern!r} matches none of the {len(names)} layers")
        chosen: dict[int, tuple[str, LayerSpec]] = {}
        for name in names:
            matrix = default.get(name) or extras[name]
            if any(matches(p, name) for p in self.skip):
                continue
            spec = next((s for m, s in self.rules if matches(m, name)), None)
            if spec is None and name in default:
                spec = self.default
            if spec is None:
                continue
            key = id(matrix.param)
            if key in chosen:
                first, other = chosen[key]
                if other != spec:
                    raise PlanError(f"tied layers {first!r} and {name!r} share one weight but get different specs")
                continue
            try:
                spec.format.num_groups(matrix.shape)
            except MixqError as e:
                raise PlanError(f"layer {name!r}: {e}") from None
            chosen[key] = (name, spec)
        return dict(chosen.values())

    def size_report(self, model: nn.Module) -> SizeReport:
        from mixq.models import matrix_by_name

        specs = self.resolve(model)
        quantized = {}
        for n, s in specs.items():
            matrix = matrix_by_name(model, n)
            quantized[id(matrix.param)] = stored_bits(s, matrix.shape) * matrix.count
        qw = qb = ow = ob = 0
        seen: set[int] = set()
        for p in model.parameters():  # parameters() yields a tied tensor once
            if id(p) in seen:
                continue
            seen.add(id(p))
            bits = quantized.get(id(p))
            if bits is None:
                ow += p.numel()
                ob += p.numel() * STORED_BITS
            else:
                qw += p.numel()
                qb += bits
        return SizeReport(qw, qb, ow, ob, len(specs))

    def bits(self, model: nn.Module) -> float:
        """Average bits per quantized weight, every overhead included."""
        return self.size_report(model).bits_per_weight

    def size_bytes(self, model: nn.Module) -> int:
        """Bytes of the whole model as stored under this plan."""
        return self.size_report(model).size_bytes

    def describe(self) -> str:
        if not self.rules and self.default is None:
            return "base"
        if not self.rules and not self.skip and self.default is not None:
            solver = "" if self.default.solver == "rtn" else f" {self.default.solver}"
            opts = "".join(f" {k}={v}" for k, v in self.default.options)
            return f"{self.default.format.name}{solver}{opts}"
        return f"{len(self.rules)} rules, default {self.default.format.name if self.default else 'none'}"


def stored_bits(spec: LayerSpec, shape: tuple[int, int]) -> int:
    """Exact bits of one ``[out, in]`` matrix under ``spec``: the format's codes and group
    parameters and the solver's extras (outliers)."""
    from mixq.solvers import get_solver

    solver = get_solver(spec.solver)
    return spec.format.storage_bits(shape) + solver.extra_bits(solver.options(spec.opts), shape)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML (or JSON) file's data; a missing or malformed file is a PlanError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as e:
        raise PlanError(f"{what} {path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None


def _check_pattern(pattern: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise PlanError(f"plan: bad regex {pattern!r}: {e}") from None


__all__ = ["LayerSpec", "Plan", "SizeReport", "stored_bits"]
