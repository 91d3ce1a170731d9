"""The search loop: propose, check the size budget, swap cached weights in, score, store.

A trial's score is a function of the model, the weight cache and the assignment alone
(``score_assignment``): the cache holds RTN weights or a layer database's solutions.

Every finished trial goes at once to the Optuna study (SQLite, ``study.db``) and to
``trials.jsonl`` (one JSON object per line) in the run directory; ``--resume`` reloads
both and carries on, losing at most the trial in flight.  Named starts (uniform plans,
user plans, sensitivity-guided plans) are evaluated first and told to the backend.  A
proposal over the budget is rejected before it is evaluated (not counted toward the
trials) and repaired: its most expensive units step down to cheaper choices until the plan
fits; the repaired plan is evaluated and recorded as a trial of its own.  What a trial is
scored on (perplexity, zero-shot accuracy, perplexity under an accuracy bound) and the value
the backends minimise are described in ``objective``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.errors import MixqError
from mixq.evaluate import perplexity
from mixq.search.backends import BackendContext, Fallback, Proposer, check_backend, make_proposer
from mixq.search.cache import WeightCache
from mixq.search.config import SearchConfig, Start
from mixq.search.objective import mean_accuracy, rank, task_summary
from mixq.search.size import SizeModel, check_budget, mutate, project, repair
from mixq.search.space import SearchSpace, Unit
from mixq.search.store import Store

ZeroShot = Callable[[nn.Module], dict[str, dict[str, Any]]]  # model -> evaluate_tasks table


@dataclass
class Study:
    """An opened study: the searched units, their exact sizes, the run directory, the finished
    trials (oldest first), the proposer, the starts still to evaluate and the count of
    proposals rejected so far.  ``fits(assignment)``: the assignment meets the budget."""

    units: list[Unit]
    size: SizeModel
    store: Store
    done: list[dict[str, Any]]
    proposer: Proposer
    queue: list[Start]
    rejected: int
    fits: Callable[[dict[str, str]], bool]


def open_study(model: nn.Module, space: SearchSpace, config: SearchConfig, run_dir: Path, *, meta: dict[str, Any],
               resume: bool, initial: list[Start] | None, parallel: int = 1) -> Study:
    """Check the budget and the backend, open (or reload) the run directory and the proposer,
    and queue the starts not yet evaluated (``parallel``: trials in flight at once)."""
    meta = {**meta, **config.describe()}
    units = space.units(model)
    size = SizeModel(space, units, model)
    check_budget(space, units, size, config)
    check_backend(config.backend, config.objectives)
    store = Store(run_dir)
    store.write_meta(meta, space, resume)
    done = store.trials()
    fits = lambda a: config.budget_ok(*size(a))  # noqa: E731
    rng = random.Random(config.seed + len(done))
    context = BackendContext(seed=config.seed, units=[u.name for u in units], choices=list(space.choices),
                             storage=store.storage_url(), resume=resume, history=done,
                             step=lambda parent: mutate(space, units, parent, fits, rng), objectives=config.objectives,
                             budget=size.budget(config), log_loss=config.objective != "acc" and config.min_acc is None,
                             parallel=parallel)
    proposer = make_proposer(config.backend, context)
    seen = {json.dumps(t["assignment"], sort_keys=True) for t in done}
    rejected = done[-1]["rejected_so_far"] if done else 0
    queued: dict[str, Start] = {}  # one trial per assignment; starts that coincide share it (labels joined)
    for start in initial or []:
        a, label = project(space, units, start.assignment), start.label
        if a != start.assignment:
            label = f"{label} (projected onto the units' allowed choices)"
        if not fits(a):
            a, label = repair(space, units, a, fits), f"{label} (repaired to fit)"
        key = json.dumps(a, sort_keys=True)
        if key in queued:
            queued[key] = Start(f"{queued[key].label} = {label}", a)
        elif key not in seen:
            queued[key] = Start(label, a)
    return Study(units, size, store, done, proposer, list(queued.values()), rejected, fits)


def vet_proposal(study: Study, space: SearchSpace, config: SearchConfig, assignment: dict[str, str],
                 handle: Any) -> tuple[dict[str, str], Any, str]:
    """(assignment, handle, source) of a proposal to evaluate: a fallback recorded as
    ``random``; one over budget rejected (counted in ``study.rejected``) and repaired."""
    source = config.backend
    if isinstance(handle, Fallback):  # the backend could not propose: a random plan instead
        source, handle = "random", None
    assignment = project(space, study.units, assignment)  # units restricted by the space's ``allowed``
    if not study.fits(assignment):
        if handle is not None:
            study.proposer.reject(handle)
        study.rejected += 1
        assignment, source, handle = repair(space, study.units, assignment, study.fits), "repaired", None
    return assignment, handle, source


@dataclass(frozen=True)
class Latency:
    """Predicted decode seconds per token of an assignment (``runtime.latency.LatencyModel``) and of the 16-bit model."""

    predict: Callable[[dict[str, str]], float]
    base_seconds: float
    predict_plan: Callable[[Any], float]  # the same for a Plan (the final table's rows)


def score_assignment(model: nn.Module, cache: WeightCache, units: list[Unit], assignment: dict[str, str],
                     score_windows: Tensor, config: SearchConfig, zero_shot: ZeroShot | None = None,
                     latency: Latency | None = None) -> dict[str, Any]:
    """Swap the assignment's weights in and score it: ``ppl`` (with ``config.tasks``: ``acc``,
    ``tasks``, ``task_seconds``; with ``latency``: ``predicted_s``, ``predicted_tokens_per_s``),
    ``loss``, ``feasible`` (meets ``min_acc`` / ``max_ppl``), ``eval_seconds``."""
    t1 = time.perf_counter()
    cache.apply(units, assignment)
    ppl = perplexity(model, score_windows, batch_size=config.batch_size).ppl
    scores: dict[str, Any] = {"ppl": ppl}
    acc = None
    if config.tasks:
        if zero_shot is None:
            raise MixqError("the search scores zero-shot tasks but was given no zero-shot scorer")
        t2 = time.perf_counter()
        table = zero_shot(model)
        acc = mean_accuracy(table, config.task_metric)
        scores.update({"acc": acc, "tasks": task_summary(table), "task_seconds": time.perf_counter() - t2})
    seconds = None
    if config.needs_latency:
        if latency is None:
            raise MixqError(f"objective {config.objective}: the search needs a latency model (--latency-table)")
        seconds = latency.predict(assignment)
        scores.update({"predicted_s": seconds, "predicted_tokens_per_s": 1.0 / seconds})
    loss, ok = config.loss(ppl, acc, seconds=seconds, base_seconds=None if latency is None else latency.base_seconds)
    return {**scores, "loss": loss, "feasible": ok, "eval_seconds": time.perf_counter() - t1}


def record_trial(study: Study, space: SearchSpace, config: SearchConfig, assignment: dict[str, str],
                 scores: dict[str, Any], handle: Any, *, source: str, propose_s: float, label: str | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the next trial record from ``score_assignment``'s scores, append it to the store,
    tell the proposer and add it to ``study.done``; returns the record.  ``extra`` keys
    (e.g. where a trial ran) go at the end of the record."""
    bits, nbytes = study.size(assignment)
    record = {"number": len(study.done), "assignment": assignment, "plan": space.plan(study.units, assignment).to_dict(),
              **{k: v for k, v in scores.items() if k not in ("feasible", "eval_seconds")}}
    if config.min_acc is not None or config.max_ppl is not None:
        record["feasible"] = scores["feasible"]
    record.update({"bits_per_weight": bits, "size_bytes": nbytes, "source": source,
                   "propose_seconds": propose_s, "eval_seconds": scores["eval_seconds"], "rejected_so_far": study.rejected})
    if label is not None:
        record["start"] = label
    record.update(extra or {})
    study.store.append(record)  # the plain store first: it is what a resumed study counts
    second = record["predicted_s"] if config.objective == "pareto" and config.pareto_over == "latency" else float(nbytes)
    values = (record["loss"], second)[: config.objectives]
    if handle is not None:
        study.proposer.tell(handle, values)
    else:
        study.proposer.add(assignment, values)
    study.done.append(record)
    return record


def best_postfix(best: dict[str, Any], config: SearchConfig) -> dict[str, str]:
    """The progress bar's note on the best trial so far."""
    return {"best_acc": f"{best['acc']:.4f}"} if config.objective == "acc" else {"best_ppl": f"{best['ppl']:.3f}"}


def run_search(model: nn.Module, space: SearchSpace, score_windows: Tensor, config: SearchConfig, run_dir: Path, *,
               meta: dict[str, Any], resume: bool = False, initial: list[Start] | None = None,
               progress: bool = True, zero_shot: ZeroShot | None = None,
               cache: WeightCache | None = None, latency: Latency | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a study; returns every finished trial record.

    ``initial`` trials come first (repaired if over budget, each assignment once); their
    records carry ``source: "initial"`` and ``start: <label>``.  Where ``config.tasks`` is
    set, ``zero_shot(model)`` (an ``evaluate_tasks`` table on the fixed subset, see
    ``objective.zero_shot_scorer``) scores them in every trial: the record gets ``acc`` (the
    mean of ``config.task_metric``) and ``tasks`` (per task), and under ``config.min_acc``
    ``feasible``.  ``loss`` is the value told to the backend.  Trials take their weights from
    ``cache`` (default: ``WeightCache.for_space`` without a layer database, which serves
    data-free solvers only)."""
    if config.tasks and zero_shot is None:
        raise MixqError("the search scores zero-shot tasks but was given no zero-shot scorer")
    study = open_study(model, space, config, run_dir, meta=meta, resume=resume, initial=initial)
    units, done, proposer, queue = study.units, study.done, study.proposer, study.queue
    cache = cache if cache is not None else WeightCache.for_space(model, space, units)
    best = min(done, key=rank, default=None)
    bar = tqdm(total=config.trials, initial=len(done), desc="search", disable=not progress)
    try:
        while len(done) < config.trials:
            t0 = time.perf_counter()
            handle, label = None, None
            if queue:
                start = queue.pop(0)
                assignment, source, label = start.assignment, "initial", start.label
            else:
                assignment, handle, source = vet_proposal(study, space, config, *proposer.ask())
            propose_s = time.perf_counter() - t0
            scores = score_assignment(model, cache, units, assignment, score_windows, config, zero_shot, latency)
            record = record_trial(study, space, config, assignment, scores, handle, source=source, propose_s=propose_s,
                                  label=label)
            best = record if best is None or rank(record) < rank(best) else best
            bar.set_postfix(**best_postfix(best, config), bits=f"{record['bits_per_weight']:.3f}")
            bar.update(1)
    finally:
        bar.close()
        cache.restore()
    return done


__all__ = ["Latency", "Study", "ZeroShot", "best_postfix", "open_study", "record_trial", "run_search", "score_assignment",
           "vet_proposal"]
