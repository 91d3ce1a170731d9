"""Guided starts: from sensitivity scores and a budget, the plan with the least predicted
damage (a multiple-choice knapsack solved greedily, then improved by exchanges), plus
randomised variants.

The predicted damage of a plan is the sum over its units of each unit's damage at its
choice; a unit's damage is the sum of its layers' scores (measured KL of the layer alone
quantized, else the FIT or Hessian score times the squared quantization error).

    costs = unit_costs(sens, {"model.layers.0": ["model.layers.0.mlp.up_proj", ...], ...})
    choice = allocate_units(costs, bits, limit)        # unit -> format, sum of bits <= limit
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mixq.errors import MixqError
from mixq.plan import LayerSpec, Plan

JITTER = 0.25  # spread of the randomised variants' costs (0.5 gave plans worse than uniform on SmolLM2-135M)


def layer_costs(sens: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Predicted damage of each (layer, format): measured KL if present, else the FIT score
    (Fisher trace per weight × squared quantization error), else the Hessian trace per weight
    × squared error."""
    out = {}
    for n, d in sens["layers"].items():
        if "measured" in d:
            out[n] = dict(d["measured"])
        elif "fit" in d:
            out[n] = {f: d["fit"]["per_param"] * e for f, e in d["noise"].items()}
        elif "hessian" in d:
            out[n] = {f: max(d["hessian"]["per_param"], 0.0) * e for f, e in d["noise"].items()}
        else:
            raise MixqError(f"sensitivity file has no scores for layer {n!r}")
    return out


def unit_costs(sens: dict[str, Any], units: Mapping[str, Sequence[str]], choices: Sequence[str] | None = None,
               names: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Predicted damage of each (unit, choice): the sum over the unit's layers, for the
    choices every one of its layers was scored at (restricted to ``choices`` if given);
    ``names`` maps a choice to the name the file scored it under, where they differ."""
    per_layer = layer_costs(sens)
    names = names or {}
    out = {}
    for u, layers in units.items():
        missing = [n for n in layers if n not in per_layer]
        if missing:
            raise MixqError(f"the sensitivity file has no layer {missing[0]!r} (made for another model?)")
        scored = set.intersection(*(set(per_layer[n]) for n in layers))
        keep = [c for c in (choices if choices is not None else sorted(scored)) if names.get(c, c) in scored]
        if not keep:
            raise MixqError(f"the sensitivity file scores none of the choices ({', '.join(choices or [])}) "
                            f"for {u!r}; it has {', '.join(sorted(scored))}")
        out[u] = {c: sum(per_layer[n][names.get(c, c)] for n in layers) for c in keep}
    return out


def allocate_units(costs: Mapping[str, Mapping[str, float]], bits: Mapping[str, Mapping[str, int]], limit: float, *,
                   jitter: float = 0.0, seed: int = 0) -> dict[str, str]:
    """The choice of each unit that minimises the summed damage with at most ``limit`` bits.

    1. every unit at its cheapest choice; 2. greedy: the step up with the largest drop in
    damage per added bit, while it fits; 3. exchanges: the single or paired move (one unit
    up, another down: insensitive units pay for sensitive ones) that lowers the total damage
    most while it fits, until none does.  ``jitter`` > 0 multiplies each cost by
    exp(N(0, jitter)) first (diverse starts)."""
    rng = random.Random(seed)
    cost = {u: {c: float(v) * (math.exp(rng.gauss(0, jitter)) if jitter > 0 else 1.0) for c, v in cu.items()}
            for u, cu in costs.items()}
    choice = {u: min(cu, key=lambda c: (bits[u][c], cu[c])) for u, cu in cost.items()}
    used = sum(bits[u][c] for u, c in choice.items())
    if used > limit:
        raise MixqError(f"infeasible budget: the cheapest choices take {used:,} bits, {used - limit:,.0f} more than allowed")
    while True:  # 2. greedy by gain per bit
        best = None
        for u, c0 in choice.items():
            for c, b in bits[u].items():
                if c not in cost[u]:
                    continue
                extra, gain = b - bits[u][c0], cost[u][c0] - cost[u][c]
                if extra > 0 and gain > 0 and used + extra <= limit and (best is None or gain / extra > best[0]):
                    best = (gain / extra, u, c, extra)
        if best is None:
            break
        _, u, c, extra = best
        choice[u], used = c, used + extra
    return _exchange(choice, cost, bits, limit)


def _exchange(choice: dict[str, str], cost: Mapping[str, Mapping[str, float]], bits: Mapping[str, Mapping[str, int]],
              limit: float) -> dict[str, str]:
    """Steepest descent over single moves and pairs of moves of two units, within the budget."""
    units = list(choice)
    total = sum(cost[u][choice[u]] for u in units)
    tol = 1e-12 * max(total, 1e-30)
    while True:
        used = sum(bits[u][choice[u]] for u in units)
        owner, target, db, dk = [], [], [], []
        for i, u in enumerate(units):
            for c in cost[u]:
                if c != choice[u]:
                    owner.append(i)
                    target.append(c)
                    db.append(bits[u][c] - bits[u][choice[u]])
                    dk.append(cost[u][c] - cost[u][choice[u]])
        if not owner:
            return choice
        own, b, k = np.array(owner), np.array(db, dtype=np.float64), np.array(dk, dtype=np.float64)
        slack = limit - used
        single = np.where(b <= slack, k, np.inf)
        pair_k = k[:, None] + k[None, :]
        pair_ok = (b[:, None] + b[None, :] <= slack) & (own[:, None] != own[None, :])
        pair = np.where(pair_ok, pair_k, np.inf)
        i1 = int(np.argmin(single))
        i2 = np.unravel_index(int(np.argmin(pair)), pair.shape)
        if min(single[i1], pair[i2]) >= -tol:
            return choice
        moves = [i1] if single[i1] <= pair[i2] else [int(i2[0]), int(i2[1])]
        for m in moves:
            choice[units[owner[m]]] = target[m]


def budget_limit(params: int, other_bits: int, *, max_bits: float | None, max_size: int | None) -> float:
    """The most bits the quantized weights may take: ``max_bits`` per weight, and the whole
    model (``other_bits`` for the rest) in ``max_size`` bytes."""
    if max_bits is None and max_size is None:
        raise MixqError("give a budget: --max-bits or --max-size")
    if max_bits is not None and not 0 < max_bits <= 16:
        raise MixqError(f"--max-bits must be in (0, 16], got {max_bits}")
    limits = []
    if max_bits is not None:
        limits.append(max_bits * params * (1 + 1e-12))
    if max_size is not None:
        limits.append(8 * max_size - other_bits)
    return min(limits)


def allocate(sens: dict[str, Any], *, max_bits: float | None = None, max_size: int | None = None,
             jitter: float = 0.0, seed: int = 0, formats: Sequence[str] | None = None) -> dict[str, str]:
    """Per layer (``mixq allocate``): each layer of the sensitivity file is a unit.
    ``formats`` restricts the choices to those (and the file's) formats."""
    layers = sens["layers"]
    if not layers:
        raise MixqError("the sensitivity file holds no layer")
    limit = budget_limit(sum(d["params"] for d in layers.values()), sens["other_bits"], max_bits=max_bits, max_size=max_size)
    allowed = [f for f in next(iter(layers.values()))["bits"] if formats is None or f in formats]
    if not allowed:
        raise MixqError(f"no format of the sensitivity file ({', '.join(next(iter(layers.values()))['bits'])}) "
                        f"is among {', '.join(sorted(formats or []))}")
    costs = unit_costs(sens, {n: [n] for n in layers}, allowed)
    return allocate_units(costs, {n: d["bits"] for n, d in layers.items()}, limit, jitter=jitter, seed=seed)


def choice_specs(sens: dict[str, Any]) -> dict[str, LayerSpec]:
    """The spec each scored choice stands for: recorded under ``choices`` by ``mixq sensitivity``
    (files without it scored formats with RTN)."""
    if "choices" in sens:
        return {c: LayerSpec.from_dict(d, f"sensitivity file choice {c!r}") for c, d in sens["choices"].items()}
    names = dict.fromkeys(f for d in sens["layers"].values() for f in d["bits"])
    return {f: LayerSpec.of(f) for f in names}


def plan_of(choice: dict[str, str], specs: Mapping[str, LayerSpec] | None = None) -> Plan:
    """The per-layer plan of an allocation (``specs``: each choice's spec; default: the format with RTN)."""
    return Plan(tuple((n, specs[f] if specs is not None else LayerSpec.of(f)) for n, f in choice.items()))
