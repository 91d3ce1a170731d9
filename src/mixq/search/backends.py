"""Search backends behind one small interface, selectable by name.

A proposer suggests assignments (unit name -> choice) and learns from results:

    assignment, handle = proposer.ask()      # a proposal (may be over budget)
    proposer.tell(handle, values)            # its objectives: (ppl,) or (ppl, size) for a Pareto front
    proposer.reject(handle)                  # over budget: dropped, never scored
    proposer.add(assignment, values)         # a trial it did not propose (initial, repaired)

* Optuna samplers (``random``, ``tpe``, ``nsga2``, ``nsga3``, ``qmc``, ``gp``), their study in
  SQLite (``study.db``);
* ``ax``: Bayesian optimisation through Ax's ``Client`` (GP/BoTorch after a Sobol start);
  rejected proposals are abandoned (never modelled); on resume the trials are replayed
  from ``trials.jsonl``, the study store for Ax;
* ``evo``: mixq's local search (mutations of good trials, as EvoPress), recorded in an
  Optuna study.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

from mixq.errors import MixqError

BACKENDS = ("random", "tpe", "nsga2", "nsga3", "qmc", "gp", "evo", "ax")


class Proposer(Protocol):
    def ask(self) -> tuple[dict[str, str], Any]: ...

    def tell(self, handle: Any, values: tuple[float, ...]) -> None: ...

    def reject(self, handle: Any) -> None: ...

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None: ...


def _optuna_samplers() -> dict[str, Callable[[int], object]]:
    import optuna

    return {
        "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
        "nsga3": lambda seed: optuna.samplers.NSGAIIISampler(seed=seed),
        "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    }


class OptunaProposer:
    def __init__(self, sampler: str, seed: int, units: list[str], choices: list[str], storage: str, resume: bool,
                 objectives: int = 1) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(study_name="mixq", storage=storage, sampler=_optuna_samplers()[sampler](seed),
                                         directions=["minimize"] * objectives, load_if_exists=resume)
        self.dists = {u: CategoricalDistribution(choices) for u in units}

    def ask(self) -> tuple[dict[str, str], Any]:
        trial = self.study.ask(self.dists)
        return {u: trial.params[u] for u in self.dists}, trial

    def tell(self, handle: Any, values: tuple[float, ...]) -> None:
        self.study.tell(handle, list(values))

    def reject(self, handle: Any) -> None:
        self.study.tell(handle, state=self.optuna.trial.TrialState.FAIL)

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None:
        self.study.add_trial(self.optuna.trial.create_trial(params=assignment, distributions=self.dists, values=list(values)))


class EvoProposer:
    """Tournament selection among the finished trials, then a mutation (see ``mutate``)."""

    def __init__(self, record: OptunaProposer, history: list[dict[str, Any]], step: Callable[[dict[str, str]], dict[str, str]],
                 seed: int) -> None:
        self.record, self.history, self.step = record, history, step
        self.rng = random.Random(seed + len(history))

    def ask(self) -> tuple[dict[str, str], Any]:
        if not self.history:
            return self.record.ask()[0], None
        parent = min(self.rng.sample(self.history, min(3, len(self.history))), key=lambda t: t["ppl"])
        return self.step(parent["assignment"]), None

    def tell(self, handle: Any, values: tuple[float, ...]) -> None:
        raise AssertionError("evo proposals are recorded with add()")

    def reject(self, handle: Any) -> None:
        pass

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None:
        self.record.add(assignment, values)


class AxProposer:
    def __init__(self, seed: int, units: list[str], choices: list[str], history: list[dict[str, Any]]) -> None:
        try:
            from ax.api.client import Client
            from ax.api.configs import ChoiceParameterConfig
        except ImportError:
            raise MixqError("backend 'ax' needs ax-platform: pip install ax-platform") from None
        for name in ("ax", "botorch", "gpytorch", "pyro"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.names = {u: f"u{i}" for i, u in enumerate(units)}  # Ax parameter names stay plain
        self.client = Client(random_seed=seed)
        self.client.configure_experiment(
            parameters=[ChoiceParameterConfig(name=p, values=list(choices), parameter_type="str", is_ordered=False)
                        for p in self.names.values()], name="mixq")
        self.client.configure_optimization(objective="-ppl")
        for t in history:  # resume: replay the finished trials
            self.add(t["assignment"], (t["ppl"],))

    def ask(self) -> tuple[dict[str, str], Any]:
        (index, params), = self.client.get_next_trials(max_trials=1).items()
        return {u: str(params[p]) for u, p in self.names.items()}, index

    def tell(self, handle: Any, values: tuple[float, ...]) -> None:
        self.client.complete_trial(handle, raw_data={"ppl": values[0]})

    def reject(self, handle: Any) -> None:
        self.client.mark_trial_abandoned(handle)

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None:
        index = self.client.attach_trial({p: assignment[u] for u, p in self.names.items()})
        self.client.complete_trial(index, raw_data={"ppl": values[0]})


MULTI_OBJECTIVE = ("random", "tpe", "nsga2", "nsga3", "qmc")


def check_backend(name: str, objectives: int = 1) -> None:
    if name not in BACKENDS:
        raise MixqError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    if objectives > 1 and name not in MULTI_OBJECTIVE:
        raise MixqError(f"backend {name!r} searches one objective; a Pareto front needs one of {', '.join(MULTI_OBJECTIVE)}")


def make_proposer(name: str, *, seed: int, units: list[str], choices: list[str], storage: str, resume: bool,
                  history: list[dict[str, Any]], step: Callable[[dict[str, str]], dict[str, str]],
                  objectives: int = 1) -> Proposer:
    check_backend(name, objectives)
    if name == "ax":
        return AxProposer(seed, units, choices, history)
    if name == "evo":
        return EvoProposer(OptunaProposer("random", seed, units, choices, storage, resume), history, step, seed)
    return OptunaProposer(name, seed, units, choices, storage, resume, objectives)
