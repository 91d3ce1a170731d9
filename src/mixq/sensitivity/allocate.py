"""Guided starts: from sensitivity scores and a budget, plans that give more bits to the
layers where bits buy the most (greedy), plus randomised variants weighted by sensitivity."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from mixq.errors import MixqError
from mixq.plan import LayerSpec, Plan


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


def allocate(sens: dict[str, Any], *, max_bits: float | None = None, max_size: int | None = None,
             jitter: float = 0.0, seed: int = 0, formats: Sequence[str] | None = None) -> dict[str, str]:
    """Greedy: every layer starts at its cheapest format; the upgrade with the largest drop
    in predicted damage per added bit is taken while the budget holds.  ``jitter`` > 0
    multiplies each layer's costs by a random factor exp(N(0, jitter)) (diverse starts).
    ``formats`` restricts the choices to those (and the file's) formats."""
    if max_bits is None and max_size is None:
        raise MixqError("give a budget: --max-bits or --max-size")
    if max_bits is not None and not 0 < max_bits <= 16:
        raise MixqError(f"--max-bits must be in (0, 16], got {max_bits}")
    layers = sens["layers"]
    if not layers:
        raise MixqError("the sensitivity file holds no layer")
    costs = layer_costs(sens)
    rng = random.Random(seed)
    if jitter > 0:
        costs = {n: {f: c * math.exp(rng.gauss(0, jitter)) for f, c in fc.items()} for n, fc in costs.items()}
    params = sum(d["params"] for d in layers.values())
    allowed = set(formats) if formats is not None else None
    ladders = {n: sorted((f for f in d["bits"] if allowed is None or f in allowed), key=lambda f: d["bits"][f])
               for n, d in layers.items()}
    if any(not ladder for ladder in ladders.values()):
        raise MixqError(f"no format of the sensitivity file ({', '.join(next(iter(layers.values()))['bits'])}) "
                        f"is among {', '.join(sorted(allowed or []))}")
    choice = {n: ladder[0] for n, ladder in ladders.items()}
    bits = sum(layers[n]["bits"][choice[n]] for n in layers)

    def fits(total: int) -> bool:
        ok = max_bits is None or total / params <= max_bits + 1e-12
        return ok and (max_size is None or math.ceil((total + sens["other_bits"]) / 8) <= max_size)

    if not fits(bits):
        have = bits / params
        raise MixqError(f"infeasible budget: the smallest formats give {have:.4f} bits/weight "
                        f"({math.ceil((bits + sens['other_bits']) / 8):,} bytes), above the budget")
    while True:
        best = None
        for n, ladder in ladders.items():
            i = ladder.index(choice[n])
            for f in ladder[i + 1 :]:
                extra = layers[n]["bits"][f] - layers[n]["bits"][choice[n]]
                gain = costs[n][choice[n]] - costs[n][f]
                if extra > 0 and gain > 0 and fits(bits + extra):
                    rate = gain / extra
                    if best is None or rate > best[0]:
                        best = (rate, n, f, extra)
        if best is None:
            return choice
        _, n, f, extra = best
        choice[n], bits = f, bits + extra


def plan_of(choice: dict[str, str], solver: str = "rtn") -> Plan:
    return Plan(tuple((n, LayerSpec.of(f, solver)) for n, f in choice.items()))
