"""A study whose trials run on Ray actors (``mixq search --workers N``, ``--ray-address``).

The driver (this process) owns the study: the proposer, the budget repair, the run directory
(``trials.jsonl`` and ``study.db``, as a single-process run).  Each worker, a ``TrialWorker``
actor, loads the model and builds its weight cache once, then scores the assignments it is
sent.  The starts go first, as in ``run_search``; then the driver asks the backend for as many
proposals as there are free workers (``Proposer.ask_many``), repairs those over budget before
they are sent, and records each result the moment it arrives (``ray.wait``).  Records are
numbered in the order they arrive; each also carries ``trial_id`` (the order it was sent in,
unique across resumed runs) and ``worker`` (the process and host that scored it).  A trial
whose worker died is run again, on the restarted worker or another (``cluster.WorkerPool``);
a trial id is recorded at most once, and no more trials are sent than the study still needs,
so none is lost or recorded twice.  ``--resume`` reloads the run directory as without Ray; the
trials in flight when the driver stopped are lost, as the one in flight is in a single-process run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.cluster import Cluster, ModelSpec, WorkerPool, identity, require_ray
from mixq.errors import MixqError
from mixq.search.cache import WeightCache
from mixq.search.config import SearchConfig, Start
from mixq.search.loop import Study, ZeroShot, best_postfix, open_study, record_trial, score_assignment, vet_proposal
from mixq.search.objective import rank
from mixq.search.space import SearchSpace, Unit

CacheFactory = Callable[[nn.Module, SearchSpace, list[Unit]], Any]  # (model, space, units) -> apply/restore cache


@dataclass(frozen=True)
class ZeroShotSpec:
    """How a worker builds its zero-shot scorer (the tasks, subset and metric are the config's)."""

    data_dir: str | None
    batch_size: int

    def scorer(self, loaded: Any, config: SearchConfig, device: str) -> ZeroShot:
        from mixq.data import bos_rule
        from mixq.search.objective import zero_shot_scorer

        bos = bos_rule(loaded.model, loaded.tokenizer)
        return zero_shot_scorer(loaded.tokenizer, config.tasks, data_dir=self.data_dir, limit=config.task_limit,
                                batch_size=self.batch_size, device=device, add_bos=bos is not None)


class TrialWorker:
    """A search worker: the model (loaded once), its weight cache (``cache_factory``, built once:
    ``WeightCache.for_space`` or a database-backed cache with ``apply``/``restore``), the scoring
    windows; ``score(assignment)`` swaps the assignment's weights in and scores it as
    ``run_search`` does (perplexity, zero-shot accuracy where the config has tasks).  A Ray
    actor under ``WorkerPool``; also usable in this process."""

    def __init__(self, spec: ModelSpec, space: SearchSpace, windows: Tensor, config: SearchConfig,
                 zero_shot: ZeroShotSpec | None, cache_factory: CacheFactory) -> None:
        loaded = spec.load()
        self.model, self.config, self.windows = loaded.model, config, windows
        self.units = space.units(self.model)
        self.cache = cache_factory(self.model, space, self.units)
        self.zero_shot = None if zero_shot is None else zero_shot.scorer(loaded, config, spec.device)
        self.where = identity()

    def identity(self) -> dict[str, Any]:
        return self.where

    def score(self, assignment: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(``score_assignment``'s scores, where they were computed)."""
        return score_assignment(self.model, self.cache, self.units, assignment, self.windows, self.config,
                                self.zero_shot), self.where


@dataclass(frozen=True)
class _Task:
    trial_id: int
    assignment: dict[str, str]
    handle: Any
    source: str
    label: str | None
    propose_s: float


def run_distributed_search(model: nn.Module, space: SearchSpace, score_windows: Tensor, config: SearchConfig,
                           run_dir: Path, *, spec: ModelSpec, cluster: Cluster, meta: dict[str, Any],
                           resume: bool = False, initial: list[Start] | None = None, progress: bool = True,
                           zero_shot: ZeroShotSpec | None = None,
                           cache_factory: CacheFactory = WeightCache.for_space,
                           on_trial: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """``run_search`` with the trials scored by ``cluster.workers`` ``TrialWorker`` actors, each
    loading ``spec``; returns every finished trial record.  ``model`` (this process's copy)
    gives the units and sizes; it is not changed.  ``on_trial(record)`` runs after each
    record is stored."""
    if config.tasks and zero_shot is None:
        raise MixqError("the search scores zero-shot tasks but was given no zero-shot spec")
    require_ray()
    study = open_study(model, space, config, run_dir, meta=meta, resume=resume, initial=initial,
                       parallel=cluster.workers)
    done = study.done
    # after every trial id of earlier runs (single-process records have none: their numbers count)
    next_id = max(1 + max((t.get("trial_id", -1) for t in done), default=-1), len(done))
    sent: dict[int, _Task] = {}
    best = min(done, key=rank, default=None)
    with cluster.connect():
        pool = WorkerPool(TrialWorker, (spec, space, score_windows, config, zero_shot, cache_factory), cluster)
        bar = tqdm(total=config.trials, initial=len(done), desc=f"search ({cluster.workers} workers)",
                   disable=not progress)
        try:
            pool.start()
            while len(done) < config.trials:
                wanted = min(pool.free(), config.trials - len(done) - pool.pending())
                for task in _next_tasks(study, space, config, wanted, next_id):
                    next_id = task.trial_id + 1
                    sent[task.trial_id] = task
                    pool.submit(task.trial_id, "score", task.assignment)
                for f in pool.next():
                    task = sent.pop(f.key, None)
                    if task is None:
                        continue  # a trial is recorded once, whatever comes back
                    scores, where = f.value
                    record = record_trial(study, space, config, task.assignment, scores, task.handle, source=task.source,
                                          propose_s=task.propose_s, label=task.label,
                                          extra={"trial_id": task.trial_id, "worker": where})
                    best = record if best is None or rank(record) < rank(best) else best
                    bar.set_postfix(**best_postfix(best, config), bits=f"{record['bits_per_weight']:.3f}")
                    bar.update(1)
                    if on_trial is not None:
                        on_trial(record)
        finally:
            bar.close()
            pool.close()
    return done


def _next_tasks(study: Study, space: SearchSpace, config: SearchConfig, n: int, first_id: int) -> list[_Task]:
    """Up to ``n`` trials to send: the starts first, then proposals (over budget: repaired)."""
    tasks: list[_Task] = []
    while study.queue and len(tasks) < n:
        start = study.queue.pop(0)
        tasks.append(_Task(first_id + len(tasks), start.assignment, None, "initial", start.label, 0.0))
    if len(tasks) < n:
        t0 = time.perf_counter()
        proposals = study.proposer.ask_many(n - len(tasks))
        vetted = [vet_proposal(study, space, config, a, h) for a, h in proposals]
        each = (time.perf_counter() - t0) / len(vetted)
        for a, h, source in vetted:
            tasks.append(_Task(first_id + len(tasks), a, h, source, None, each))
    return tasks


__all__ = ["CacheFactory", "TrialWorker", "ZeroShotSpec", "run_distributed_search"]
