"""The search loop: propose, check the size budget, swap cached weights in, score, store.

A trial's score is a function of the model, the weight cache and the assignment alone
(``evaluate_trial``): the cache holds RTN weights or a layer database's solutions.

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
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.errors import MixqError
from mixq.evaluate import perplexity
from mixq.search.backends import BackendContext, Fallback, check_backend, make_proposer
from mixq.search.cache import WeightCache
from mixq.search.config import SearchConfig, Start
from mixq.search.objective import mean_accuracy, rank, task_summary
from mixq.search.size import SizeModel, check_budget, mutate, repair
from mixq.search.space import SearchSpace, Unit
from mixq.search.store import Store

ZeroShot = Callable[[nn.Module], dict[str, dict[str, Any]]]  # model -> evaluate_tasks table


def evaluate_trial(model: nn.Module, cache: WeightCache, units: list[Unit], assignment: dict[str, str],
                   score_windows: Tensor, config: SearchConfig, zero_shot: ZeroShot | None = None) -> dict[str, Any]:
    """Score one assignment: its weights copied in from ``cache``, perplexity on the scoring
    windows (and zero-shot accuracy where ``config.tasks``); ``loss`` and ``feasible`` as
    ``config.loss`` says.  The model keeps the trial's weights (``cache.restore`` puts them back)."""
    cache.apply(units, assignment)
    scores: dict[str, Any] = {"ppl": perplexity(model, score_windows, batch_size=config.batch_size).ppl}
    acc = None
    if config.tasks:
        if zero_shot is None:
            raise MixqError("the search scores zero-shot tasks but was given no zero-shot scorer")
        t = time.perf_counter()
        table = zero_shot(model)
        acc = mean_accuracy(table, config.task_metric)
        scores.update({"acc": acc, "tasks": task_summary(table), "task_seconds": time.perf_counter() - t})
    scores["loss"], scores["feasible"] = config.loss(scores["ppl"], acc)
    return scores


def run_search(model: nn.Module, space: SearchSpace, score_windows: Tensor, config: SearchConfig, run_dir: Path, *,
               meta: dict[str, Any], resume: bool = False, initial: list[Start] | None = None,
               progress: bool = True, zero_shot: ZeroShot | None = None,
               cache: WeightCache | None = None) -> list[dict[str, Any]]:
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
                             budget=size.budget(config), log_loss=config.objective != "acc" and config.min_acc is None)
    cache = cache if cache is not None else WeightCache.for_space(model, space, units)
    proposer = make_proposer(config.backend, context)
    seen = {json.dumps(t["assignment"], sort_keys=True) for t in done}
    rejected = done[-1]["rejected_so_far"] if done else 0
    queued: dict[str, Start] = {}  # one trial per assignment; starts that coincide share it (labels joined)
    for start in initial or []:
        a, label = start.assignment, start.label
        if not fits(a):
            a, label = repair(space, units, a, fits), f"{label} (repaired to fit)"
        key = json.dumps(a, sort_keys=True)
        if key in queued:
            queued[key] = Start(f"{queued[key].label} = {label}", a)
        elif key not in seen:
            queued[key] = Start(label, a)
    queue = list(queued.values())
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
                assignment, handle = proposer.ask()
                source = config.backend
                if isinstance(handle, Fallback):  # the backend could not propose: a random plan instead
                    source, handle = "random", None
                if not fits(assignment):
                    if handle is not None:
                        proposer.reject(handle)
                    rejected += 1
                    assignment, source, handle = repair(space, units, assignment, fits), "repaired", None
            propose_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            scores = evaluate_trial(model, cache, units, assignment, score_windows, config, zero_shot)
            loss, ok = scores.pop("loss"), scores.pop("feasible")
            eval_s = time.perf_counter() - t1
            bits, nbytes = size(assignment)
            record = {"number": len(done), "assignment": assignment, "plan": space.plan(units, assignment).to_dict(),
                      **scores, "loss": loss}
            if config.min_acc is not None:
                record["feasible"] = ok
            record.update({"bits_per_weight": bits, "size_bytes": nbytes, "source": source,
                           "propose_seconds": propose_s, "eval_seconds": eval_s, "rejected_so_far": rejected})
            if label is not None:
                record["start"] = label
            store.append(record)  # the plain store first: it is what a resumed study counts
            values = (loss, float(nbytes))[: config.objectives]
            if handle is not None:
                proposer.tell(handle, values)
            else:
                proposer.add(assignment, values)
            done.append(record)
            best = record if best is None or rank(record) < rank(best) else best
            shown = {"best_acc": f"{best['acc']:.4f}"} if config.objective == "acc" else {"best_ppl": f"{best['ppl']:.3f}"}
            bar.set_postfix(**shown, bits=f"{bits:.3f}")
            bar.update(1)
    finally:
        bar.close()
        cache.restore()
    return done


__all__ = ["ZeroShot", "evaluate_trial", "run_search"]
