"""``evo``: mixq's local search (mutations of good trials, as EvoPress), recorded in an Optuna study."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from mixq.search.backends.base import BackendContext, Proposer, register_backend
from mixq.search.backends.optuna import OptunaProposer
from mixq.search.objective import loss_of


class EvoProposer(Proposer):
    """Tournament selection among the finished trials, then a mutation (see ``mutate``)."""

    def __init__(self, record: OptunaProposer, history: list[dict[str, Any]], step: Callable[[dict[str, str]], dict[str, str]],
                 seed: int) -> None:
        self.record, self.history, self.step = record, history, step
        self.rng = random.Random(seed + len(history))

    def ask(self) -> tuple[dict[str, str], Any]:
        if not self.history:
            return self.record.ask()[0], None
        parent = min(self.rng.sample(self.history, min(3, len(self.history))), key=loss_of)
        return self.step(parent["assignment"]), None

    def tell(self, handle: Any, values: tuple[float, ...]) -> None:
        raise AssertionError("evo proposals are recorded with add()")

    def reject(self, handle: Any) -> None:
        pass

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None:
        self.record.add(assignment, values)


@register_backend("evo", multi_objective=False, help="local search from the best trials (EvoPress-style mutations)")
def _evo(c: BackendContext) -> EvoProposer:
    return EvoProposer(OptunaProposer("random", c.seed, c.units, c.choices, c.storage, c.resume), c.history, c.step, c.seed)


__all__ = ["EvoProposer"]
