"""Optuna samplers as search backends; the study lives in SQLite (``study.db``) in the run directory.
The genetic samplers (NSGA-II/III) count added trials in their populations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mixq.search.backends.base import BackendContext, Proposer, register_backend

NSGA_POPULATION = 20  # five generations in a study of 100 trials (Optuna's default of 50 makes two)


def _optuna_samplers(parallel: bool = False) -> dict[str, Callable[[int], object]]:
    """``parallel``: trials run while others are proposed; TPE then counts the running ones as
    bad (its ``constant_liar``) so that proposals made together differ."""
    import optuna

    return {
        "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=parallel),
        "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA_POPULATION),
        "nsga3": lambda seed: optuna.samplers.NSGAIIISampler(seed=seed, population_size=NSGA_POPULATION),
        "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
    }


class OptunaProposer(Proposer):
    def __init__(self, sampler: str, seed: int, units: list[str], choices: list[str], storage: str, resume: bool,
                 objectives: int = 1, parallel: bool = False) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(study_name="mixq", storage=storage,
                                         sampler=_optuna_samplers(parallel)[sampler](seed),
                                         directions=["minimize"] * objectives, load_if_exists=resume)
        self.dists = {u: CategoricalDistribution(choices) for u in units}
        # genetic samplers (NSGA-II/III) keep a generation number on each trial; an added trial
        # joins generation 0 (a start) or the generation of the proposal it repairs
        key = getattr(self.study.sampler, "_get_generation_key", None)
        self.generation_key: str | None = key() if key is not None else None
        self.generation = 0

    def ask(self) -> tuple[dict[str, str], Any]:
        trial = self.study.ask(self.dists)
        return {u: trial.params[u] for u in self.dists}, trial

    def tell(self, handle: Any, values: tuple[float, ...]) -> None:
        self.study.tell(handle, list(values))

    def reject(self, handle: Any) -> None:
        if self.generation_key is not None:
            frozen = self.study.get_trials(deepcopy=False)[handle.number]  # trial numbers index the study's trials
            self.generation = frozen.system_attrs.get(self.generation_key, self.generation)
        self.study.tell(handle, state=self.optuna.trial.TrialState.FAIL)

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None:
        attrs = {} if self.generation_key is None else {self.generation_key: self.generation}
        self.study.add_trial(self.optuna.trial.create_trial(params=assignment, distributions=self.dists, values=list(values),
                                                            system_attrs=attrs))


_HELP = {"random": "uniform random plans", "tpe": "Optuna's multivariate TPE", "nsga2": "NSGA-II (genetic)",
         "nsga3": "NSGA-III (genetic)", "qmc": "quasi-Monte Carlo (Sobol)", "gp": "Optuna's Gaussian-process sampler"}
_SINGLE_OBJECTIVE = {"gp"}


def _factory(sampler: str) -> Callable[[BackendContext], OptunaProposer]:
    def build(c: BackendContext) -> OptunaProposer:
        return OptunaProposer(sampler, c.seed, c.units, c.choices, c.storage, c.resume, c.objectives, c.parallel > 1)

    return build


for _name, _help in _HELP.items():
    register_backend(_name, multi_objective=_name not in _SINGLE_OBJECTIVE, help=_help)(_factory(_name))

__all__ = ["NSGA_POPULATION", "OptunaProposer"]
