"""What a search trial is scored on, and the one number the backends minimise (its ``loss``).

* ``ppl``: perplexity on the scoring windows; loss = ppl.
* ``pareto``: perplexity and size (or the predicted decode time per token), two values (loss = ppl).
* ``throughput`` with ``max_ppl``: the fastest plan (decode time per token predicted by a
  latency model, ``mixq.runtime.latency``) whose perplexity is at most the bound: a feasible
  trial's loss is s / (s + s_base) < 1, an infeasible one's 1 + (ppl / max_ppl − 1) > 1
  (``runtime.latency.throughput_loss``), so every infeasible trial ranks below every feasible one.
* ``acc``: the mean zero-shot accuracy over the chosen tasks on a fixed subset (the first
  ``task_limit`` examples of each task, the same in every trial), maximised: loss = 1 − acc.
* ``ppl`` with ``min_acc``: perplexity under an accuracy constraint.  A trial whose accuracy
  is below the bound is infeasible: it stays in ``trials.jsonl`` (``feasible: false``) but is
  never the best.  Every backend is told one penalised value (Optuna's ``constraints_func``
  and Ax's outcome constraints are not used): a feasible trial's loss is
  log ppl / (1 + log ppl), in [0, 1) and in the order of perplexity; an infeasible one's is
  1 + (min_acc − acc), so every infeasible trial ranks below every feasible one and a near
  miss above a far one.

Accuracy (``acc`` in a trial record) is the mean over the tasks of one lm-eval metric:
``acc`` (the choice of highest log-likelihood) or ``acc_norm`` (lm-eval's, log-likelihood per
character).  Perplexity is measured in every trial whatever the objective.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from mixq.errors import MixqError

OBJECTIVES = ("ppl", "pareto", "acc", "throughput")
PARETO_AXES = ("size", "latency")  # the second objective of a Pareto search
TASK_METRICS = ("acc", "acc_norm")
RESCORE_FACTOR = 4  # the best few trials are re-scored on 4x the windows / task examples
ACC_TOLERANCE = 1e-12  # acc is k/n: a bound equal to it, up to rounding, is met


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """``--tasks a,b`` as a tuple of names; empty lists, repeats and perplexity sets refused."""
    from mixq.evaluate.zeroshot import PERPLEXITY_TASKS

    if text is None:
        return ()
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise MixqError("--tasks is empty")
    if len(set(names)) != len(names):
        raise MixqError(f"--tasks names a task twice: {text}")
    ppl = [t for t in names if t in PERPLEXITY_TASKS]
    if ppl:
        raise MixqError(f"--tasks {', '.join(ppl)}: the search always measures perplexity on the validation windows; "
                        "--tasks takes zero-shot tasks only")
    return names


def _local_metrics(name: str) -> set[str]:
    """The metrics a shipped task YAML lists (``metric_list: - metric: acc``)."""
    from mixq.evaluate.zeroshot import TASK_DIR

    text = (TASK_DIR / f"{name}.yaml").read_text()
    return set(re.findall(r"^\s*-\s*metric:\s*(\S+)", text, flags=re.MULTILINE))


def check_tasks(names: tuple[str, ...], data_dir: str | os.PathLike | None, metric: str) -> None:
    """Refuse, before a model is loaded: a missing task file, an unknown task, a task
    without ``metric``.  Names that are not local tasks are looked up in lm-eval's index."""
    from mixq.evaluate.zeroshot import resolve_tasks

    if metric not in TASK_METRICS:
        raise MixqError(f"--task-metric {metric!r}: one of {', '.join(TASK_METRICS)}")
    refs = resolve_tasks(list(names), data_dir)
    for r in refs:
        if r.local and metric not in _local_metrics(r.name):
            raise MixqError(f"task {r.label} reports no {metric} (it reports {', '.join(sorted(_local_metrics(r.name)))})")
    hub = [r.label for r in refs if not r.local]
    if hub:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        unknown = [t for t in hub if t not in known]
        if unknown:
            from mixq.evaluate.zeroshot import LOCAL

            raise MixqError(f"unknown task {', '.join(unknown)} (local tasks: {', '.join(LOCAL)}; "
                            "other names must be lm-eval tasks)")


def zero_shot_scorer(tokenizer: Any, tasks: tuple[str, ...], *, data_dir: str | os.PathLike | None,
                     limit: int | None, batch_size: int, device: str, add_bos: bool,
                     stderr: bool = False) -> Callable[[Any], dict[str, dict[str, Any]]]:
    """``score(model) -> evaluate_tasks(model, ...)`` on the first ``limit`` examples of each task
    (without the bootstrap standard errors unless ``stderr``: a trial needs only the means)."""
    from mixq.evaluate.zeroshot import evaluate_tasks

    return functools.partial(evaluate_tasks, tokenizer=tokenizer, tasks=list(tasks), data_dir=data_dir, limit=limit,
                             batch_size=batch_size, device=device, add_bos=add_bos,
                             **({} if stderr else {"bootstrap_iters": 0}))


def mean_accuracy(table: Mapping[str, Mapping[str, Any]], metric: str) -> float:
    """The unweighted mean of ``metric`` over the tasks of an ``evaluate_tasks`` table."""
    missing = [t for t, m in table.items() if metric not in m]
    if missing or not table:
        raise MixqError(f"no {metric} reported for task(s) {', '.join(missing) or '(none)'}")
    return sum(float(m[metric]) for m in table.values()) / len(table)


def task_summary(table: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: its accuracies and standard errors (where lm-eval gave them) and its example count."""
    keep = (*TASK_METRICS, *(f"{m}_stderr" for m in TASK_METRICS), "n")
    return {t: {k: m[k] for k in keep if k in m} for t, m in table.items()}


def trial_loss(objective: str, ppl: float, acc: float | None, min_acc: float | None, *,
               seconds: float | None = None, max_ppl: float | None = None,
               base_seconds: float | None = None) -> tuple[float, bool]:
    """(the value the backends minimise, whether the trial meets ``min_acc`` or ``max_ppl``); see the
    module text.  ``seconds`` (the trial's predicted decode time) and ``base_seconds`` (the 16-bit
    model's) serve the throughput objective."""
    if objective == "throughput":
        from mixq.runtime.latency import throughput_loss

        if seconds is None or base_seconds is None or max_ppl is None:
            raise MixqError("objective throughput: the trial needs a predicted time and a --max-ppl bound")
        return throughput_loss(seconds, ppl, max_ppl=max_ppl, base_seconds=base_seconds)
    if objective == "acc":
        if acc is None:
            raise MixqError("objective acc: the trial has no accuracy (no tasks scored)")
        return 1.0 - acc, True
    if min_acc is None:
        return ppl, True
    if acc is None:
        raise MixqError("--min-acc: the trial has no accuracy (no tasks scored)")
    if acc < min_acc - ACC_TOLERANCE:
        return 1.0 + (min_acc - acc), False
    if not math.isfinite(ppl):
        return 1.0, True  # a diverged plan: worse than any finite perplexity, still above every infeasible trial
    lp = max(math.log(ppl), 0.0)
    return lp / (1.0 + lp), True


def loss_of(record: Mapping[str, Any]) -> float:
    """The loss a trial record was told to the backend with (older records: their perplexity)."""
    return float(record.get("loss", record["ppl"]))


def feasible(record: Mapping[str, Any]) -> bool:
    return bool(record.get("feasible", True))


def rank(record: Mapping[str, Any]) -> tuple[bool, float]:
    """Sort key, best first: feasible trials before infeasible ones, then by loss."""
    return (not feasible(record), loss_of(record))


def pareto_front(trials: list[dict[str, Any]], over: str = "size") -> list[dict[str, Any]]:
    """The trials no other trial beats on both perplexity and size (``over="latency"``: predicted
    decode time), by increasing size (time)."""
    key = "size_bytes" if over == "size" else "predicted_s"
    front: list[dict[str, Any]] = []
    for t in sorted(trials, key=lambda t: (t[key], t["ppl"])):
        if not front or t["ppl"] < front[-1]["ppl"]:
            front.append(t)
    return front


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    return min(trials, key=rank)


__all__ = ["ACC_TOLERANCE", "OBJECTIVES", "PARETO_AXES", "RESCORE_FACTOR", "TASK_METRICS", "best_trial", "check_tasks", "pareto_front", "feasible",
           "loss_of", "mean_accuracy", "parse_tasks", "rank", "task_summary", "trial_loss", "zero_shot_scorer"]
