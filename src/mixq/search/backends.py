"""Search backends: Optuna samplers by name, and ``evo``, mixq's local search (mutations of good
trials, as EvoPress); Ax is not wired in yet."""

from __future__ import annotations

from collections.abc import Callable

from mixq.errors import MixqError


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


BACKENDS = ("random", "tpe", "nsga2", "nsga3", "qmc", "gp", "evo", "ax")


def make_sampler(name: str, seed: int) -> object:
    if name == "ax":
        raise MixqError("backend 'ax' is not available in this version of mixq; use tpe, nsga2, nsga3, qmc, random or gp")
    samplers = _optuna_samplers()
    if name == "evo":  # mixq's own local search proposes; the Optuna study only records its trials
        return samplers["random"](seed)
    if name not in samplers:
        raise MixqError(f"unknown backend {name!r} (one of {', '.join(BACKENDS)})")
    return samplers[name](seed)
