"""A study's configuration (budget, objective, tasks) and the starts evaluated before any proposal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixq.errors import MixqError
from mixq.search.objective import OBJECTIVES, PARETO_AXES, TASK_METRICS, trial_loss


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
    max_ppl: float | None = None  # objective "throughput": trials whose perplexity is above this are infeasible
    pareto_over: str = "size"  # objective "pareto": the second objective, "size" or predicted "latency"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise MixqError(f"unknown objective {self.objective!r} (one of {', '.join(OBJECTIVES)})")
        if self.task_metric not in TASK_METRICS:
            raise MixqError(f"--task-metric {self.task_metric!r}: one of {', '.join(TASK_METRICS)}")
        if self.task_limit is not None and self.task_limit < 1:
            raise MixqError(f"--task-limit must be positive, got {self.task_limit}")
        if self.pareto_over not in PARETO_AXES:
            raise MixqError(f"--pareto-over {self.pareto_over!r}: one of {', '.join(PARETO_AXES)}")
        if self.objective == "throughput" and self.max_ppl is None:
            raise MixqError("--objective throughput needs --max-ppl X (the perplexity bound on the scoring windows)")
        if self.max_ppl is not None:
            if self.objective != "throughput":
                raise MixqError(f"--max-ppl bounds a throughput search (--objective throughput), not --objective "
                                f"{self.objective}")
            if not self.max_ppl > 0:
                raise MixqError(f"--max-ppl must be positive, got {self.max_ppl}")
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

    @property
    def needs_latency(self) -> bool:
        """Whether every trial needs a predicted decode time (throughput, or a Pareto front over latency)."""
        return self.objective == "throughput" or (self.objective == "pareto" and self.pareto_over == "latency")

    def loss(self, ppl: float, acc: float | None, *, seconds: float | None = None,
             base_seconds: float | None = None) -> tuple[float, bool]:
        """The value the backends minimise and whether the trial meets ``min_acc`` / ``max_ppl`` (see ``objective``)."""
        return trial_loss(self.objective, ppl, acc, self.min_acc, seconds=seconds, max_ppl=self.max_ppl,
                          base_seconds=base_seconds)

    def describe(self) -> dict[str, Any]:
        """What the trials' scores mean (kept in config.json; a resumed study must match it)."""
        tasks = list(self.tasks) or None
        return {"objective": self.objective, "tasks": tasks, "task_limit": self.task_limit if tasks else None,
                "task_metric": self.task_metric if tasks else None, "min_acc": self.min_acc,
                **({"max_ppl": self.max_ppl} if self.max_ppl is not None else {}),
                **({"pareto_over": self.pareto_over} if self.objective == "pareto" else {})}

    def budget_ok(self, bits: float, size: int) -> bool:
        return (self.max_bits is None or bits <= self.max_bits + 1e-12) and (self.max_size is None or size <= self.max_size)


__all__ = ["SearchConfig", "Start"]
