"""Exact size of any assignment of a space, the budget it must meet, and moves that respect it:
``repair`` (step down until the plan fits, then spend what is left) and ``mutate`` (a local step)."""

from __future__ import annotations

import math
import random
from typing import Any

from torch import nn

from mixq.errors import PlanError
from mixq.layers import stored_bits
from mixq.models import matrix_by_name
from mixq.search.backends import Budget
from mixq.search.config import SearchConfig
from mixq.search.space import SearchSpace, Unit


def cost_order(space: SearchSpace, shape: tuple[int, int]) -> list[str]:
    """The choices from the cheapest to the dearest on a weight of ``shape`` (the solvers' extra bits counted)."""
    return sorted(space.choices, key=lambda c: stored_bits(space.cost_spec(c), shape))


def unit_orders(space: SearchSpace, units: list[Unit]) -> dict[str, list[str]]:
    """Each unit's allowed choices in cost order."""
    order = cost_order(space, (4096, 4096))
    return {u.name: [c for c in order if c in space.choices_of(u.name)] for u in units}


def project(space: SearchSpace, units: list[Unit], assignment: dict[str, str]) -> dict[str, str]:
    """Each unit's choice where the space allows it, else the allowed choice nearest to it in
    cost order (the cheaper of two as near): the identity on a space without ``allowed``."""
    order = cost_order(space, (4096, 4096))
    out = {}
    for u in units:
        c, allowed = assignment[u.name], space.choices_of(u.name)
        out[u.name] = c if c in allowed else min(allowed, key=lambda a: (abs(order.index(a) - order.index(c)),
                                                                         order.index(a)))
    return out


def repair(space: SearchSpace, units: list[Unit], assignment: dict[str, str], fits) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Step the most expensive units down one (allowed) choice at a time until ``fits(assignment)``,
    then lift the cheapest ones while the plan still fits."""
    order = cost_order(space, (4096, 4096))
    orders = unit_orders(space, units)
    a = project(space, units, assignment)
    while not fits(a):
        candidates = [u for u in units if orders[u.name].index(a[u.name]) > 0]
        if not candidates:
            raise PlanError("no plan of this space fits the budget")
        worst = max(candidates, key=lambda u: (order.index(a[u.name]), -units.index(u)))
        steps = orders[worst.name]
        a[worst.name] = steps[steps.index(a[worst.name]) - 1]
    # then spend what is left: lift the cheapest units one choice while the plan still fits
    changed = True
    while changed:
        changed = False
        for u in sorted(units, key=lambda u: order.index(a[u.name])):
            steps = orders[u.name]
            i = steps.index(a[u.name])
            if i + 1 < len(steps):
                trial = {**a, u.name: steps[i + 1]}
                if fits(trial):
                    a, changed = trial, True
    return a


class SizeModel:
    """Exact bits/weight and bytes of any assignment, by summing per-(layer, choice) bits
    computed once (the same counts as ``Plan.size_report``, without building a plan): codes,
    group parameters and what each choice's solver stores beside them (outliers)."""

    def __init__(self, space: SearchSpace, units: list[Unit], model: nn.Module) -> None:
        first = {u.name: space.choices[0] for u in units}
        rep = space.plan(units, first).size_report(model)
        self.units = units
        self.bits: dict[tuple[str, str], int] = {}
        self.params = {u.name: sum(matrix_by_name(model, n).numel for n in u.layers) for u in units}
        for u in units:
            for c in space.choices:
                total = 0
                for layer in u.layers:
                    m = matrix_by_name(model, layer)
                    total += stored_bits(space.spec_of(layer, c), m.shape) * m.count
                self.bits[(u.name, c)] = total
        searched = sum(self.bits[(u.name, first[u.name])] for u in units)
        self.fixed_bits = rep.quantized_bits - searched  # pinned layers
        self.other_bits = rep.other_bits
        self.weights = rep.quantized_weights

    def __call__(self, assignment: dict[str, str]) -> tuple[float, int]:
        q = self.fixed_bits + sum(self.bits[(u.name, assignment[u.name])] for u in self.units)
        return q / self.weights, math.ceil((q + self.other_bits) / 8)

    def budget(self, config: SearchConfig) -> Budget:
        """The budget as a bound on the searched units' summed bits (exactly ``config.budget_ok``:
        the whole model's bytes are the ceiling of its bits / 8)."""
        limits = []
        if config.max_bits is not None:
            limits.append((config.max_bits + 1e-12) * self.weights - self.fixed_bits)
        if config.max_size is not None:
            limits.append(8 * config.max_size - self.other_bits - self.fixed_bits)
        bits = {u.name: {c: b for (n, c), b in self.bits.items() if n == u.name} for u in self.units}
        return Budget(bits, dict(self.params), min(limits) if limits else None)


def mutate(space: SearchSpace, units: list[Unit], parent: dict[str, str], fits, rng: random.Random,  # type: ignore[no-untyped-def]
           moves: int = 2) -> dict[str, str]:
    """A local step (as EvoPress's search): ``moves`` random units one choice up, as many one
    choice down (in cost order), then repaired to fit the budget."""
    orders = unit_orders(space, units)
    a = project(space, units, parent)
    for _ in range(moves):
        up, down = rng.sample(units, 2) if len(units) > 1 else (units[0], units[0])
        steps = orders[up.name]
        a[up.name] = steps[min(steps.index(a[up.name]) + 1, len(steps) - 1)]
        steps = orders[down.name]
        a[down.name] = steps[max(steps.index(a[down.name]) - 1, 0)]
    return a if fits(a) else repair(space, units, a, fits)


def check_budget(space: SearchSpace, units: list[Unit], size: SizeModel, config: SearchConfig) -> None:
    """Refuse a budget that no plan of the space meets, saying by how much."""
    if config.max_bits is not None and not 0 < config.max_bits <= 16:
        raise PlanError(f"--max-bits must be in (0, 16], got {config.max_bits}")
    orders = unit_orders(space, units)
    bits, nbytes = size({u.name: orders[u.name][0] for u in units})
    if config.max_bits is not None and bits > config.max_bits:
        raise PlanError(f"infeasible budget: the smallest plan of this space averages {bits:.4f} bits/weight, "
                        f"{bits - config.max_bits:.4f} above --max-bits {config.max_bits}")
    if config.max_size is not None and nbytes > config.max_size:
        raise PlanError(f"infeasible budget: the smallest plan of this space takes {nbytes:,} bytes, "
                        f"{nbytes - config.max_size:,} more than --max-size {config.max_size:,}")


__all__ = ["SizeModel", "check_budget", "cost_order", "mutate", "project", "repair", "unit_orders"]
