"""Sensitivity-guided starts of a study."""

from __future__ import annotations

from typing import Any

from mixq.database.store import describe
from mixq.errors import MixqError
from mixq.search.config import SearchConfig, Start
from mixq.search.size import SizeModel
from mixq.search.space import SearchSpace, Unit
from mixq.sensitivity.allocate import JITTER


def guided_starts(sens: dict[str, Any], space: SearchSpace, units: list[Unit], size: SizeModel, config: SearchConfig, *,
                  count: int, seed: int, jitter: float = JITTER) -> list[Start]:
    """``count`` starts from a sensitivity file (``mixq sensitivity``): the allocation with the
    least predicted damage over the space's units within the budget, then variants with
    costs jittered by exp(N(0, jitter)).  None without a budget (a Pareto search).  The file
    must have scored each choice with the spec it has in the space (a QuantEase choice with
    the database's QuantEase weights, not RTN's)."""
    from mixq.sensitivity.allocate import allocate_units, choice_specs, unit_costs

    budget = size.budget(config)
    if budget.limit is None:
        return []
    scored = choice_specs(sens)
    names = {}  # a choice -> the name the file scored its spec under
    for c in space.choices:
        same = [name for name, spec in scored.items() if spec == space.spec(c)]
        if same:
            names[c] = same[0]
        elif c in scored:
            raise MixqError(f"the sensitivity file scores {c!r} as {describe(scored[c])}, but in this space it is "
                            f"{describe(space.spec(c))}: measure it on this space's choices (mixq sensitivity "
                            "--formats ... --db DIR for choices solved with calibration)")
    costs = unit_costs(sens, {u.name: u.layers for u in units}, space.choices, names)
    method = next((m for m in ("measured", "fit", "hessian") if m in sens.get("methods_done", [])), "scores")
    method = "measured KL" if method == "measured" else method
    starts = []
    for k in range(count):
        choice = allocate_units(costs, budget.bits, budget.limit, jitter=0.0 if k == 0 else jitter, seed=seed + k)
        starts.append(Start(f"guided: greedy on {method}" + ("" if k == 0 else f", costs jittered (seed {seed + k})"), choice))
    return starts


__all__ = ["guided_starts"]
