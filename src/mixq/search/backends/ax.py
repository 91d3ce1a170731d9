"""``ax``: Bayesian optimisation through Ax's ``Client`` (a GP with analytic LogEI on log perplexity,
or on the loss itself where it is not a perplexity, after Sobol trials while fewer than ``SOBOL_TRIALS``
trials exist).  Each unit is an *ordered numeric* choice whose values are the unit's exact bits per
weight under each choice, so the size budget is one linear parameter constraint and the GP's
proposals fit (Sobol's may not: those, like any proposal over budget, are rejected before they are
scored).  On resume the trials are replayed from ``trials.jsonl``, the study store for Ax."""

from __future__ import annotations

import functools
import logging
import math
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mixq.errors import MixqError
from mixq.search.backends.base import BackendContext, Budget, Fallback, Proposer, register_backend
from mixq.search.objective import loss_of

PROPOSAL_THREADS = 1  # a GP of ~100 points: more threads only add overhead (10x slower on a busy 2-core host)
SOBOL_TRIALS = 5  # quasi-random trials before the GP, counting the starts (uniform plans, guided plans)
ACQF_OPTIONS = {"num_restarts": 4, "raw_samples": 256}  # discrete local search of LogEI (Ax: 20 and 1024)
FIT_ITERATIONS = 100  # L-BFGS steps of the GP's hyperparameter fit (unbounded: ~500 at 60 trials, 3/5 of a proposal)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.cache
def _capped_gp() -> type:
    """Ax's default GP (BoTorch's ``SingleTaskGP``) whose hyperparameter fit stops after
    ``FIT_ITERATIONS`` L-BFGS steps, registered with Ax's model-fitting dispatcher."""
    from ax.generators.torch.botorch_modular.utils import fit_botorch_model
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    class CappedFitGP(SingleTaskGP):
        pass

    @fit_botorch_model.register(CappedFitGP)
    def _fit(model, mll_class, mll_options=None):  # type: ignore[no-untyped-def]
        mll = mll_class(likelihood=model.likelihood, model=model, **(mll_options or {}))
        fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": FIT_ITERATIONS}})

    return CappedFitGP


def neighbours(X: Any, levels: list[Any], constraints: list[tuple[Any, Any, float]], *, centres: int = 20,
               pair_centres: int | None = None, random_points: int = 1024, generator: Any = None) -> Any:
    """Candidate plans for the acquisition, in the GP's input space (one column per unit, its
    value one of ``levels[i]``, sorted): every plan one change (a unit to any other level) from
    the first ``centres`` rows of ``X`` (best first), every plan with one unit one level up and
    another one level down from the first ``pair_centres`` rows (the moves along a tight
    budget; default: 3, fewer where that makes over 30,000 plans), and uniform
    random plans; only those meeting every constraint (``sum(x[idx] * coef) >= rhs``), once
    each, none a row of ``X``."""
    import torch

    if pair_centres is None:
        pair_centres = max(1, min(3, 30_000 // max(len(levels) ** 2, 1)))

    def feasible(C: Any) -> Any:
        ok = torch.ones(len(C), dtype=torch.bool)
        for idx, coef, rhs in constraints:
            ok &= (C[:, idx] * coef.to(C)).sum(-1) >= rhs - 1e-9
        return C[ok]

    out = []
    for x in X[:centres]:
        for i, lv in enumerate(levels):
            C = x.repeat(len(lv), 1)
            C[:, i] = lv
            out.append(C)
    for x in X[:pair_centres]:
        pos = [int(torch.searchsorted(lv, x[i].contiguous().view(1)).item()) for i, lv in enumerate(levels)]
        ups = [i for i, lv in enumerate(levels) if pos[i] + 1 < len(lv)]
        downs = [j for j in range(len(levels)) if pos[j] > 0]
        pairs = [(i, j) for i in ups for j in downs if i != j]
        if pairs:
            C = x.repeat(len(pairs), 1)
            for r, (i, j) in enumerate(pairs):
                C[r, i], C[r, j] = levels[i][pos[i] + 1], levels[j][pos[j] - 1]
            out.append(C)
    if random_points:
        R = torch.stack([lv[torch.randint(len(lv), (random_points,), generator=generator)] for lv in levels], dim=1)
        out.append(R.to(X))
    C = torch.unique(feasible(torch.cat(out)), dim=0)
    seen = (C[:, None, :] == X[None, :, :]).all(-1).any(-1) if len(X) else torch.zeros(len(C), dtype=torch.bool)
    return C[~seen]


@functools.cache
def _neighbourhood_acquisition() -> type:
    """Ax's ``Acquisition`` whose discrete optimisation runs over ``neighbours`` of the trials
    so far (best first by the GP's mean) instead of BoTorch's local search from random
    lattice points, which finds no feasible start under a tight budget (3.25 bits/weight)."""
    import torch
    from ax.generators.torch.botorch_modular.acquisition import Acquisition

    class NeighbourhoodAcquisition(Acquisition):
        def optimize(self, n, search_space_digest, inequality_constraints=None, equality_constraints=None,  # type: ignore[no-untyped-def]
                     fixed_features=None, rounding_func=None, optimizer_options=None, candidate_set=None,
                     sampling_strategy=None):
            ssd = search_space_digest
            discrete = ssd.discrete_choices or {}
            if (candidate_set is None and sampling_strategy is None and not fixed_features and not equality_constraints
                    and self.X_observed is not None and len(discrete) == len(ssd.feature_names)):
                X = self.X_observed if self.X_pending is None else torch.cat([self.X_observed, self.X_pending])
                with torch.no_grad():
                    mean = self.surrogate.model.posterior(X).mean
                    order = (mean * self._objective_weights.to(mean)).sum(-1).argsort(descending=True)
                levels = [torch.tensor(sorted(discrete[i]), dtype=X.dtype) for i in range(len(ssd.feature_names))]
                gen = torch.Generator().manual_seed(len(X))
                candidates = neighbours(X[order], levels, inequality_constraints or [], generator=gen)
                if len(candidates) >= n:
                    candidate_set = candidates.to(self.device)
            return super().optimize(n, search_space_digest, inequality_constraints=inequality_constraints,
                                    equality_constraints=equality_constraints, fixed_features=fixed_features,
                                    rounding_func=rounding_func, optimizer_options=optimizer_options,
                                    candidate_set=candidate_set, sampling_strategy=sampling_strategy)

    return NeighbourhoodAcquisition


def _ax_generation_strategy(seed: int, parallel: bool = False):  # type: ignore[no-untyped-def]
    """Sobol until ``SOBOL_TRIALS`` trials exist (the starts count), then Ax's modular BoTorch
    generator with analytic LogEI, maximised over the neighbours of the trials so far.
    ``parallel`` (trials in flight while another is proposed, or several proposed at once):
    Monte-Carlo qLogEI, which conditions on the pending trials (analytic LogEI takes none)."""
    from ax.adapter.registry import Generators
    from ax.core.trial_status import TrialStatus
    from ax.generation_strategy.generation_node import GenerationNode
    from ax.generation_strategy.generation_strategy import GenerationStrategy
    from ax.generation_strategy.generator_spec import GeneratorSpec
    from ax.generation_strategy.transition_criterion import MinTrials
    from ax.generators.torch.botorch_modular.surrogate import ModelConfig, SurrogateSpec
    from botorch.acquisition.analytic import LogExpectedImprovement
    from botorch.acquisition.logei import qLogExpectedImprovement

    sobol = GenerationNode(
        name="Sobol", generator_specs=[GeneratorSpec(generator_enum=Generators.SOBOL, generator_kwargs={"seed": seed})],
        transition_criteria=[MinTrials(threshold=SOBOL_TRIALS, transition_to="MBM", use_all_trials_in_exp=True,
                                       not_in_statuses=[TrialStatus.FAILED, TrialStatus.ABANDONED])],
        should_deduplicate=True)
    mbm = GenerationNode(
        name="MBM", generator_specs=[GeneratorSpec(
            generator_enum=Generators.BOTORCH_MODULAR,
            generator_kwargs={"botorch_acqf_class": qLogExpectedImprovement if parallel else LogExpectedImprovement,
                              "acquisition_class": _neighbourhood_acquisition(),
                              "surrogate_spec": SurrogateSpec(model_configs=[ModelConfig(botorch_model_class=_capped_gp())])},
            generator_gen_kwargs={"model_gen_options": {"optimizer_kwargs": dict(ACQF_OPTIONS)}})],
        should_deduplicate=True)
    return GenerationStrategy(name="Sobol+MBM:LogEI", nodes=[sobol, mbm])


def _log_ppl(ppl: float) -> float:
    return math.log(ppl) if math.isfinite(ppl) and ppl > 0 else 50.0  # a diverged plan: e^50, worse than any real one


class AxProposer(Proposer):
    """Ax's ``Client``; the size budget as a linear constraint over ordered numeric choices
    (each value: the unit's bits per weight under that choice), so the GP sees how close
    two choices are in cost and the local search of the acquisition stays within budget.
    Where two choices of a unit cost the same bits (no order by size) the choices are plain
    categories and over-budget proposals are rejected and repaired.  ``log_loss``: the loss
    is a perplexity, modelled on a log scale (else as it is, e.g. 1 − accuracy).  ``parallel``:
    proposals are made while other trials are pending (Monte-Carlo qLogEI, which conditions on
    them, in place of analytic LogEI)."""

    def __init__(self, seed: int, units: list[str], choices: list[str], history: list[dict[str, Any]],
                 budget: Budget | None, log_loss: bool = True, parallel: bool = False) -> None:
        try:
            from ax.api.client import Client
            from ax.api.configs import ChoiceParameterConfig
        except ImportError:
            raise MixqError("backend 'ax' needs ax-platform: pip install ax-platform") from None
        from ax.utils.common.logger import set_stderr_log_level

        set_stderr_log_level(logging.WARNING)  # not a line per trial
        for name in ("botorch", "gpytorch", "pyro"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.names = {u: f"u{i}" for i, u in enumerate(units)}  # Ax parameter names stay plain
        self.encode: dict[str, dict[str, Any]] = {}
        ordered = budget is not None
        if budget is not None:
            for u in units:
                values = {c: round(budget.bits[u][c] / budget.weights[u], 6) for c in choices}
                ordered &= len(set(values.values())) == len(values)
                self.encode[u] = values
        if not ordered:
            self.encode = {u: {c: c for c in choices} for u in units}
        self.decode = {u: {v: c for c, v in enc.items()} for u, enc in self.encode.items()}
        parameters = [ChoiceParameterConfig(name=self.names[u], values=sorted(self.encode[u].values()),
                                            parameter_type="float" if ordered else "str", is_ordered=ordered)
                      for u in units]
        constraints = []
        if ordered and budget is not None and budget.limit is not None:
            total = sum(budget.weights.values())  # sum_u (w_u / W) * bpw_u <= limit / W, in bits per weight
            terms = " + ".join(f"{budget.weights[u] / total:.12g}*{self.names[u]}" for u in units)
            constraints.append(f"{terms} <= {budget.limit / total + 1e-6:.12g}")
        self.client = Client(random_seed=seed)
        self.client.configure_experiment(parameters=parameters, parameter_constraints=constraints, name="mixq")
        self.metric, self.transform = ("log_ppl", _log_ppl) if log_loss else ("loss", float)
        self.client.configure_optimization(objective=f"-{self.metric}")
        self.client.set_generation_strategy(_ax_generation_strategy(seed, parallel))
        self.rng = random.Random(seed)
        self.units, self.choices, self.budget = units, choices, budget
        for t in history:  # resume: replay the finished trials
            self.add(t["assignment"], (loss_of(t),))

    def ask(self) -> tuple[dict[str, str], Any]:
        return self.ask_many(1)[0]

    def ask_many(self, n: int) -> list[tuple[dict[str, str], Any]]:
        """Up to ``n`` proposals from one ``get_next_trials(max_trials=n)`` (Ax may make fewer)."""
        try:
            with torch_threads(PROPOSAL_THREADS):
                trials = self.client.get_next_trials(max_trials=n)
            if not trials:
                raise RuntimeError("no trial proposed")
        except Exception as e:  # noqa: BLE001 - a failed generation must not end a long study
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"mixq: Ax could not propose ({reason}); a random plan instead", file=sys.stderr)
            return [({u: self.rng.choice(self.choices) for u in self.units}, Fallback(reason))]
        return [({u: self.decode[u][params[p]] for u, p in self.names.items()}, index) for index, params in trials.items()]

    def tell(self, handle: Any, values: tuple[float, ...]) -> None:
        self.client.complete_trial(handle, raw_data={self.metric: self.transform(values[0])})

    def reject(self, handle: Any) -> None:
        if not isinstance(handle, Fallback):
            self.client.mark_trial_abandoned(handle)

    def add(self, assignment: dict[str, str], values: tuple[float, ...]) -> None:
        if self.budget is not None and not self.budget.fits(assignment):
            return  # outside the constrained space (never so for a study's trials: they fit)
        index = self.client.attach_trial({p: self.encode[u][assignment[u]] for u, p in self.names.items()})
        self.client.complete_trial(index, raw_data={self.metric: self.transform(values[0])})


@register_backend("ax", multi_objective=False, help="Bayesian optimisation (Ax Client, GP + LogEI)")
def _ax(c: BackendContext) -> AxProposer:
    return AxProposer(c.seed, c.units, c.choices, c.history, c.budget, c.log_loss, c.parallel > 1)


__all__ = ["AxProposer", "neighbours"]
