"""Guided starts: the allocation over units of a budget by predicted damage."""

from __future__ import annotations

import random

import pytest

from mixq.errors import MixqError
from mixq.sensitivity.allocate import allocate, allocate_units, budget_limit, unit_costs


def _total(choice, costs):
    return sum(costs[u][c] for u, c in choice.items())


def test_exchange_lets_an_insensitive_unit_pay_for_a_sensitive_one():
    # greedy by gain per bit takes B up first (6/bit against A's 5/bit), then A's step no longer fits;
    # the exchange (A up, B back down) fits and removes more damage
    costs = {"A": {"lo": 10.0, "hi": 0.0}, "B": {"lo": 10.0, "hi": 4.0}}
    bits = {"A": {"lo": 1, "hi": 3}, "B": {"lo": 1, "hi": 2}}
    assert allocate_units(costs, bits, 4) == {"A": "hi", "B": "lo"}


def test_allocation_fits_and_beats_the_uniform_plan_it_can_afford():
    rng = random.Random(0)
    choices = {"c2": 2, "c3": 3, "c4": 4, "c5": 5}
    units = [f"u{i}" for i in range(12)]
    weights = {u: rng.choice([1, 2, 3]) for u in units}
    bits = {u: {c: b * weights[u] * 100 for c, b in choices.items()} for u in units}
    scale = {u: rng.random() ** 3 for u in units}
    costs = {u: {c: weights[u] * scale[u] * 2.0 ** -b for c, b in choices.items()} for u in units}
    limit = sum(bits[u]["c4"] for u in units)
    choice = allocate_units(costs, bits, limit)
    assert sum(bits[u][choice[u]] for u in units) <= limit
    assert _total(choice, costs) < _total({u: "c4" for u in units}, costs)
    assert len(set(choice.values())) > 1
    for seed in (1, 2):  # jittered variants differ but fit
        other = allocate_units(costs, bits, limit, jitter=0.5, seed=seed)
        assert sum(bits[u][other[u]] for u in units) <= limit


def test_infeasible_budget_and_unit_costs():
    with pytest.raises(MixqError, match="infeasible budget"):
        allocate_units({"A": {"lo": 1.0}}, {"A": {"lo": 8}}, 7)
    sens = {"layers": {"a.q": {"measured": {"x": 1.0, "y": 0.5}}, "a.k": {"measured": {"x": 2.0, "y": 0.25, "z": 0.0}}},
            "methods_done": ["measured"]}
    assert unit_costs(sens, {"a": ["a.q", "a.k"]}) == {"a": {"x": 3.0, "y": 0.75}}  # z: not scored for every layer
    assert unit_costs(sens, {"a": ["a.q", "a.k"]}, ["y"]) == {"a": {"y": 0.75}}
    with pytest.raises(MixqError, match="no layer 'b.q'"):
        unit_costs(sens, {"b": ["b.q"]})
    with pytest.raises(MixqError, match="scores none of the choices"):
        unit_costs(sens, {"a": ["a.q"]}, ["w"])


def test_budget_limit_and_per_layer_allocate():
    assert budget_limit(100, 64, max_bits=4.0, max_size=None) == pytest.approx(400.0)
    assert budget_limit(100, 64, max_bits=4.0, max_size=50) == 8 * 50 - 64
    with pytest.raises(MixqError, match="give a budget"):
        budget_limit(100, 0, max_bits=None, max_size=None)
    sens = {"other_bits": 0, "layers": {
        n: {"params": 10, "bits": {"int2": 20, "int4": 40}, "measured": {"int2": s, "int4": s / 10}}
        for n, s in (("a", 5.0), ("b", 1.0), ("c", 0.1))}}
    assert allocate(sens, max_bits=3.0) == {"a": "int4", "b": "int2", "c": "int2"}
    assert allocate(sens, max_bits=3.0, formats=["int2"]) == {"a": "int2", "b": "int2", "c": "int2"}
