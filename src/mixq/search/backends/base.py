"""Search backends behind one small interface, selectable by name from a registry.

A proposer suggests assignments (unit name -> choice) and learns from results:

    assignment, handle = proposer.ask()      # a proposal (may be over budget)
    proposer.tell(handle, values)            # its objectives: (loss,) or (ppl, size) for a Pareto front
    proposer.reject(handle)                  # over budget: dropped, never scored
    proposer.add(assignment, values)         # a trial it did not propose (a start, a repaired proposal)
    proposals = proposer.ask_many(n)         # up to n proposals at once, for trials run in parallel

* Optuna samplers (``random``, ``tpe``, ``nsga2``, ``nsga3``, ``qmc``, ``gp``), their study in
  SQLite (``study.db``); the genetic samplers count added trials in their populations;
* ``ax``: Bayesian optimisation through Ax's ``Client`` (a GP with analytic LogEI on log
  perplexity, or on the loss itself where it is not a perplexity, after Sobol trials while fewer than ``SOBOL_TRIALS`` trials exist).  Each unit
  is an *ordered numeric* choice whose values are the unit's exact bits per weight under
  each choice, so the size budget is one linear parameter constraint and the GP's proposals
  fit (Sobol's may not: those, like any proposal over budget, are rejected before they are
  scored).  On resume the trials are replayed from ``trials.jsonl``, the study store for Ax;
* ``evo``: mixq's local search (mutations of good trials, as EvoPress), recorded in an
  Optuna study.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mixq.errors import MixqError


@dataclass(frozen=True)
class Budget:
    """The size budget as the searched units see it: the exact stored bits of each
    (unit, choice), each unit's weight count, and the most bits the units may take
    together (``None``: no budget, as in a Pareto search)."""

    bits: Mapping[str, Mapping[str, int]]
    weights: Mapping[str, int]
    limit: float | None

    def fits(self, assignment: Mapping[str, str]) -> bool:
        return self.limit is None or sum(self.bits[u][c] for u, c in assignment.items()) <= self.limit


@dataclass(frozen=True)
class Fallback:
    """The handle of a proposal the backend could not make (a random plan in its place);
    the study records it as ``source: "random"`` and tells it back with ``add``."""

    reason: str


class Proposer(Protocol):
    def ask(self) -> tuple[dict[str, str], Any]: ...

    def ask_many(self, n: int) -> list[tuple[dict[str, str], Any]]:
        """Up to ``n`` proposals, each pending until told or rejected (at least one; by default ``ask`` n times)."""
        return [self.ask() for _ in range(n)]

    def tell(self, handle: Any, values: tuple[float, ...]) -> None: ...

    def reject(self, handle: Any) -> None: ...

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None: ...


@dataclass(frozen=True)
class BackendContext:
    """Everything a backend may use to build its proposer."""

    seed: int
    units: list[str]
    choices: list[str]
    storage: str  # the Optuna storage URL of the run directory (``study.db``)
    resume: bool
    history: list[dict[str, Any]]  # finished trial records, oldest first
    step: Callable[[dict[str, str]], dict[str, str]]  # a local move that fits the budget (evo)
    objectives: int = 1
    budget: Budget | None = None
    log_loss: bool = True  # the loss is a perplexity: model it on a log scale
    parallel: int = 1  # trials evaluated at once (workers): proposals are made while others are pending


@dataclass(frozen=True)
class Backend:
    name: str
    factory: Callable[[BackendContext], Proposer]
    multi_objective: bool
    help: str


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, *, multi_objective: bool, help: str) -> Callable:
    """Register ``factory(context) -> Proposer`` under ``name``."""

    def deco(factory: Callable[[BackendContext], Proposer]) -> Callable[[BackendContext], Proposer]:
        if name in _BACKENDS:
            raise ValueError(f"search backend {name!r} registered twice")
        _BACKENDS[name] = Backend(name, factory, multi_objective, help)
        return factory

    return deco


def backend_names() -> list[str]:
    return list(_BACKENDS)


def check_backend(name: str, objectives: int = 1) -> None:
    if name not in _BACKENDS:
        raise MixqError(f"unknown backend {name!r} (one of {', '.join(_BACKENDS)})")
    if objectives > 1 and not _BACKENDS[name].multi_objective:
        multi = [n for n, b in _BACKENDS.items() if b.multi_objective]
        raise MixqError(f"backend {name!r} searches one objective; a Pareto front needs one of {', '.join(multi)}")


def make_proposer(name: str, context: BackendContext) -> Proposer:
    check_backend(name, context.objectives)
    return _BACKENDS[name].factory(context)


__all__ = ["Backend", "BackendContext", "Budget", "Fallback", "Proposer", "backend_names", "check_backend",
           "make_proposer", "register_backend"]
