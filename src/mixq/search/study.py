"""The search loop: propose, check the size budget, swap cached weights in, score, store.

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
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.errors import MixqError, PlanError
from mixq.evaluate import perplexity
from mixq.formats import parse_format
from mixq.models import each_matrix, matrix_by_name
from mixq.search.backends import Budget, Fallback, check_backend, make_proposer
from mixq.search.objective import OBJECTIVES, TASK_METRICS, mean_accuracy, rank, task_summary, trial_loss
from mixq.search.space import SearchSpace, Unit
from mixq.sensitivity.allocate import JITTER

ZeroShot = Callable[[nn.Module], dict[str, dict[str, Any]]]  # model -> evaluate_tasks table


@dataclass(frozen=True)
class Start:
    """A trial evaluated before the backend proposes any: a name and an assignment."""

    label: str
    assignment: dict[str, str]


@dataclass(frozen=True)
class SearchConfig:
    backend: str = "tpe"
    trials: int = 100
    max_bits: float | None = None  # average bits per quantized weight
    max_size: int | None = None  # bytes of the whole model
    seed: int = 0
    batch_size: int = 8
    rescore_top: int = 5  # best trials re-scored on the re-scoring windows
    objective: str = "ppl"  # "ppl": perplexity (under the budget); "pareto": perplexity and size; "acc": accuracy
    tasks: tuple[str, ...] = ()  # zero-shot tasks scored in every trial (needed by "acc" and min_acc)
    task_limit: int | None = None  # the first N examples of each task, the same in every trial (None: all)
    task_metric: str = "acc"  # "acc" or "acc_norm", averaged over the tasks into a trial's acc
    min_acc: float | None = None  # objective "ppl": trials whose acc is below this are infeasible

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise MixqError(f"unknown objective {self.objective!r} (one of {', '.join(OBJECTIVES)})")
        if self.task_metric not in TASK_METRICS:
            raise MixqError(f"--task-metric {self.task_metric!r}: one of {', '.join(TASK_METRICS)}")
        if self.task_limit is not None and self.task_limit < 1:
            raise MixqError(f"--task-limit must be positive, got {self.task_limit}")
        if self.objective == "acc" and not self.tasks:
            raise MixqError("--objective acc needs --tasks (e.g. --tasks piqa,arc_easy)")
        if self.min_acc is not None:
            if not 0.0 <= self.min_acc <= 1.0:
                raise MixqError(f"--min-acc must be in [0, 1], got {self.min_acc}")
            if self.objective != "ppl":
                raise MixqError(f"--min-acc constrains a perplexity search (--objective ppl), not --objective {self.objective}")
            if not self.tasks:
                raise MixqError("--min-acc needs --tasks: the accuracy it bounds is the mean over those tasks")

    @property
    def objectives(self) -> int:
        return 2 if self.objective == "pareto" else 1

    def loss(self, ppl: float, acc: float | None) -> tuple[float, bool]:
        """The value the backends minimise and whether the trial meets ``min_acc`` (see ``objective``)."""
        return trial_loss(self.objective, ppl, acc, self.min_acc)

    def describe(self) -> dict[str, Any]:
        """What the trials' scores mean (kept in config.json; a resumed study must match it)."""
        tasks = list(self.tasks) or None
        return {"objective": self.objective, "tasks": tasks, "task_limit": self.task_limit if tasks else None,
                "task_metric": self.task_metric if tasks else None, "min_acc": self.min_acc}

    def budget_ok(self, bits: float, size: int) -> bool:
        return (self.max_bits is None or bits <= self.max_bits + 1e-12) and (self.max_size is None or size <= self.max_size)


class WeightCache:
    """Fake-quantized weights per (layer, choice), computed once; a trial only swaps them in.

    Kept on the model's device. Only data-free solvers (RTN) are cached; calibrated
    solvers are applied to the final plan (see the report).  ``pinned`` layers (the space's
    fixed ones) take their format in every trial.
    """

    def __init__(self, model: nn.Module, layers: list[str], pinned: dict[str, str] | None = None) -> None:
        self.model = model
        self.pinned = dict(pinned or {})
        self.matrices = {n: matrix_by_name(model, n) for n in [*layers, *self.pinned]}
        self.original = {n: m.get().detach().clone() for n, m in self.matrices.items()}
        self.cache: dict[tuple[str, str], Tensor] = {}

    def weight(self, layer: str, choice: str) -> Tensor:
        key = (layer, choice)
        if key not in self.cache:
            w = self.original[layer]
            self.cache[key] = each_matrix(w, parse_format(choice).fake_quantize).to(w.dtype)
        return self.cache[key]

    @torch.no_grad()
    def apply(self, units: list[Unit], assignment: dict[str, str]) -> None:
        for u in units:
            for layer in u.layers:
                self.matrices[layer].set(self.weight(layer, assignment[u.name]))
        for layer, choice in self.pinned.items():
            self.matrices[layer].set(self.weight(layer, choice))

    @torch.no_grad()
    def restore(self) -> None:
        for n, w in self.original.items():
            self.matrices[n].set(w)

    @classmethod
    def for_space(cls, model: nn.Module, space: SearchSpace, units: list[Unit]) -> WeightCache:
        """The cache of a space's searched layers, its fixed layers pinned to their formats."""
        from mixq.plan import Plan

        searched = [n for u in units for n in u.layers]
        fixed = Plan(space.fixed).resolve(model) if space.fixed else {}
        return cls(model, searched, {n: spec.format.name for n, spec in fixed.items() if n not in searched})


def _cost_order(space: SearchSpace, shape: tuple[int, int]) -> list[str]:
    return sorted(space.choices, key=lambda c: parse_format(c).bits_per_weight(shape))


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials no other trial beats on both perplexity and size, by increasing size."""
    front: list[dict[str, Any]] = []
    for t in sorted(trials, key=lambda t: (t["size_bytes"], t["ppl"])):
        if not front or t["ppl"] < front[-1]["ppl"]:
            front.append(t)
    return front


def repair(space: SearchSpace, units: list[Unit], assignment: dict[str, str], fits) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Step the most expensive units down one choice at a time until ``fits(assignment)``,
    then lift the cheapest ones while the plan still fits."""
    order = _cost_order(space, (4096, 4096))
    a = dict(assignment)
    while not fits(a):
        candidates = [u for u in units if order.index(a[u.name]) > 0]
        if not candidates:
            raise PlanError("no plan of this space fits the budget")
        worst = max(candidates, key=lambda u: (order.index(a[u.name]), -units.index(u)))
        a[worst.name] = order[order.index(a[worst.name]) - 1]
    # then spend what is left: lift the cheapest units one choice while the plan still fits
    changed = True
    while changed:
        changed = False
        for u in sorted(units, key=lambda u: order.index(a[u.name])):
            i = order.index(a[u.name])
            if i + 1 < len(order):
                trial = {**a, u.name: order[i + 1]}
                if fits(trial):
                    a, changed = trial, True
    return a


class SizeModel:
    """Exact bits/weight and bytes of any assignment, by summing per-(layer, choice) bits
    computed once (the same counts as ``Plan.size_report``, without building a plan)."""

    def __init__(self, space: SearchSpace, units: list[Unit], model: nn.Module) -> None:
        from mixq.solvers import get_solver

        first = {u.name: space.choices[0] for u in units}
        rep = space.plan(units, first).size_report(model)
        solver = get_solver(space.solver)
        opts = solver.options({})
        self.units = units
        self.bits: dict[tuple[str, str], int] = {}
        self.params = {u.name: sum(matrix_by_name(model, n).numel for n in u.layers) for u in units}
        for u in units:
            for c in space.choices:
                fmt = parse_format(c)
                total = 0
                for layer in u.layers:
                    m = matrix_by_name(model, layer)
                    total += (fmt.storage_bits(m.shape) + solver.extra_bits(opts, m.shape)) * m.count
                self.bits[(u.name, c)] = total
        searched = sum(self.bits[(u.name, first[u.name])] for u in units)
        self.fixed_bits = rep.quantized_bits - searched  # pinned layers
        self.other_bits = rep.other_bits
        self.weights = rep.quantized_weights

    def __call__(self, assignment: dict[str, str]) -> tuple[float, int]:
        q = self.fixed_bits + sum(self.bits[(u.name, assignment[u.name])] for u in self.units)
        return q / self.weights, math.ceil((q + self.other_bits) / 8)

    def budget(self, config: SearchConfig) -> Budget:
        """The budget as a bound on the searched units' summed bits (exactly ``config.budget_ok``:
        the whole model's bytes are the ceiling of its bits / 8)."""
        limits = []
        if config.max_bits is not None:
            limits.append((config.max_bits + 1e-12) * self.weights - self.fixed_bits)
        if config.max_size is not None:
            limits.append(8 * config.max_size - self.other_bits - self.fixed_bits)
        bits = {u.name: {c: b for (n, c), b in self.bits.items() if n == u.name} for u in self.units}
        return Budget(bits, dict(self.params), min(limits) if limits else None)


def mutate(space: SearchSpace, units: list[Unit], parent: dict[str, str], fits, rng: random.Random,  # type: ignore[no-untyped-def]
           moves: int = 2) -> dict[str, str]:
    """A local step (as EvoPress's search): ``moves`` random units one choice up, as many one
    choice down (in cost order), then repaired to fit the budget."""
    order = _cost_order(space, (4096, 4096))
    a = dict(parent)
    for _ in range(moves):
        up, down = rng.sample(units, 2) if len(units) > 1 else (units[0], units[0])
        i = order.index(a[up.name])
        a[up.name] = order[min(i + 1, len(order) - 1)]
        j = order.index(a[down.name])
        a[down.name] = order[max(j - 1, 0)]
    return a if fits(a) else repair(space, units, a, fits)


def check_budget(space: SearchSpace, units: list[Unit], size: SizeModel, config: SearchConfig) -> None:
    """Refuse a budget that no plan of the space meets, saying by how much."""
    if config.max_bits is not None and not 0 < config.max_bits <= 16:
        raise PlanError(f"--max-bits must be in (0, 16], got {config.max_bits}")
    cheapest = _cost_order(space, (4096, 4096))[0]
    bits, nbytes = size({u.name: cheapest for u in units})
    if config.max_bits is not None and bits > config.max_bits:
        raise PlanError(f"infeasible budget: the smallest plan of this space averages {bits:.4f} bits/weight, "
                        f"{bits - config.max_bits:.4f} above --max-bits {config.max_bits}")
    if config.max_size is not None and nbytes > config.max_size:
        raise PlanError(f"infeasible budget: the smallest plan of this space takes {nbytes:,} bytes, "
                        f"{nbytes - config.max_size:,} more than --max-size {config.max_size:,}")


class Store:
    """The run directory: config, space, trials.jsonl, study.db, best plans, report."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.trials_path = run_dir / "trials.jsonl"

    def storage_url(self) -> str:
        return f"sqlite:///{(self.dir / 'study.db').resolve()}"

    def write_meta(self, meta: dict[str, Any], space: SearchSpace, resume: bool) -> None:
        path = self.dir / "config.json"
        if resume:
            if not path.is_file():
                raise MixqError(f"--resume: {self.dir} holds no study (no config.json)")
            old = json.loads(path.read_text())
            for key in ("model_sha256", "space", "objective", "max_bits", "max_size", "seqlen", "limit", "tasks",
                        "task_limit", "task_metric", "min_acc"):
                if old.get(key) != meta.get(key):
                    raise MixqError(f"--resume: {self.dir} was made with another {key} "
                                    f"({old.get(key)!r}, now {meta.get(key)!r}); use a new --run-dir")
            return
        if path.exists() or self.trials_path.exists():
            raise MixqError(f"{self.dir} already holds a study; pass --resume to continue it or choose another --run-dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "space.yaml").write_text(json.dumps(space.to_dict(), indent=2))
        path.write_text(json.dumps(meta, indent=2))

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with self.trials_path.open("a") as fh:  # one write per trial; a torn last line is skipped on read
            fh.write(line)
            fh.flush()

    def trials(self) -> list[dict[str, Any]]:
        if not self.trials_path.is_file():
            return []
        out = []
        for line in self.trials_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        return out


def run_search(model: nn.Module, space: SearchSpace, score_windows: Tensor, config: SearchConfig, run_dir: Path, *,
               meta: dict[str, Any], resume: bool = False, initial: list[Start] | None = None,
               progress: bool = True, zero_shot: ZeroShot | None = None) -> list[dict[str, Any]]:
    """Run (or resume) a study; returns every finished trial record.

    ``initial`` trials come first (repaired if over budget, each assignment once); their
    records carry ``source: "initial"`` and ``start: <label>``.  Where ``config.tasks`` is
    set, ``zero_shot(model)`` (an ``evaluate_tasks`` table on the fixed subset, see
    ``objective.zero_shot_scorer``) scores them in every trial: the record gets ``acc`` (the
    mean of ``config.task_metric``) and ``tasks`` (per task), and under ``config.min_acc``
    ``feasible``.  ``loss`` is the value told to the backend."""
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
    proposer = make_proposer(config.backend, seed=config.seed, units=[u.name for u in units], choices=list(space.choices),
                             storage=store.storage_url(), resume=resume, history=done,
                             step=lambda parent: mutate(space, units, parent, fits, rng), objectives=config.objectives,
                             budget=size.budget(config), log_loss=config.objective != "acc" and config.min_acc is None)
    cache = WeightCache.for_space(model, space, units)
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
            cache.apply(units, assignment)
            ppl = perplexity(model, score_windows, batch_size=config.batch_size).ppl
            scores: dict[str, Any] = {"ppl": ppl}
            acc = None
            if config.tasks:
                t2 = time.perf_counter()
                table = zero_shot(model)  # type: ignore[misc]
                acc = mean_accuracy(table, config.task_metric)
                scores.update({"acc": acc, "tasks": task_summary(table), "task_seconds": time.perf_counter() - t2})
            loss, ok = config.loss(ppl, acc)
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


def guided_starts(sens: dict[str, Any], space: SearchSpace, units: list[Unit], size: SizeModel, config: SearchConfig, *,
                  count: int, seed: int, jitter: float = JITTER) -> list[Start]:
    """``count`` starts from a sensitivity file (``mixq sensitivity``): the allocation with the
    least predicted damage over the space's units within the budget, then variants with
    costs jittered by exp(N(0, jitter)).  None without a budget (a Pareto search)."""
    from mixq.sensitivity.allocate import allocate_units, unit_costs

    budget = size.budget(config)
    if budget.limit is None:
        return []
    costs = unit_costs(sens, {u.name: u.layers for u in units}, space.choices)
    method = next((m for m in ("measured", "fit", "hessian") if m in sens.get("methods_done", [])), "scores")
    method = "measured KL" if method == "measured" else method
    starts = []
    for k in range(count):
        choice = allocate_units(costs, budget.bits, budget.limit, jitter=0.0 if k == 0 else jitter, seed=seed + k)
        starts.append(Start(f"guided: greedy on {method}" + ("" if k == 0 else f", costs jittered (seed {seed + k})"), choice))
    return starts


@torch.no_grad()
def requantize_seconds(model: nn.Module, space: SearchSpace, units: list[Unit], assignments: list[dict[str, str]],
                       score_windows: Tensor, *, batch_size: int) -> list[float]:
    """Seconds per trial of the loop the weight cache replaces: put the full-precision weights
    back (from a copy in host memory), quantize every searched layer from scratch, score."""
    from mixq.quantize import quantize_

    plans = [space.plan(units, a) for a in assignments]
    layers = {n for p in plans for n in p.resolve(model)}
    matrices = {n: matrix_by_name(model, n) for n in layers}
    host = {n: m.get().detach().to("cpu", copy=True) for n, m in matrices.items()}
    out = []
    try:
        for plan in plans:
            t = time.perf_counter()
            for n, w in host.items():
                matrices[n].set(w)
            quantize_(model, plan.with_solver("rtn"))
            perplexity(model, score_windows, batch_size=batch_size)
            out.append(time.perf_counter() - t)
    finally:
        for n, w in host.items():
            matrices[n].set(w)
    return out


__all__ = ["SearchConfig", "SizeModel", "Start", "Store", "WeightCache", "guided_starts", "repair",
           "requantize_seconds", "run_search"]
