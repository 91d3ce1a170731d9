"""Per-layer sensitivity on Ray workers (``mixq sensitivity --workers N``), split by layer with
``mixq.cluster.map_layers``: each worker loads the model once, then scores the layers it is sent.

* measured KL: the layers go in contiguous groups (``GROUPS_PER_WORKER`` per worker); a group
  costs one forward pass of the base model (its log-probabilities) plus one per (layer,
  format), as ``analysis.measured`` over those layers; the numbers are those of one process.
* Hessian trace: one layer per call (Hutchinson on that layer alone, as ``--per-layer``, and
  as the first seed ran one layer per GPU); layer ``i`` draws its probes from ``seed + i``, so
  the estimates are not those of a one-process ``--per-layer`` run (which draws every layer's
  probes from one generator in turn) but have the same distribution.  ``max_seconds`` is
  each layer's time budget.

The Fisher trace (FIT) does not split: one backward pass gives every layer's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mixq.cluster import Cluster, ModelSpec, map_layers
from mixq.sensitivity import analysis

GROUPS_PER_WORKER = 4  # measured KL: each group pays one base pass; four per worker keep the workers evenly busy


@dataclass(frozen=True)
class MeasuredKL:
    """``map_layers`` factory: per worker, the model; per item (a group of layers) ``analysis.measured``."""

    spec: ModelSpec
    windows: Tensor
    formats: tuple[str, ...]
    batch_size: int

    def __call__(self) -> Callable[[list[str]], dict[str, dict[str, float]]]:
        model = self.spec.load().model
        return lambda layers: analysis.measured(model, self.windows, list(layers), list(self.formats),
                                                batch_size=self.batch_size)


@dataclass(frozen=True)
class HessianTrace:
    """``map_layers`` factory: per worker, the model (eager attention); per item ``(i, layer)`` the
    Hutchinson trace of that layer alone, its probes drawn from ``seed + i``."""

    spec: ModelSpec
    windows: Tensor
    max_iter: int
    tol: float
    batch_size: int
    seed: int
    max_seconds: float | None
    probe_windows: int | None

    def __call__(self) -> Callable[[tuple[int, str]], dict[str, dict[str, Any]]]:
        model = self.spec.load().model

        def run(item: tuple[int, str]) -> dict[str, dict[str, Any]]:
            i, layer = item
            return analysis.hessian(model, self.windows, [layer], max_iter=self.max_iter, tol=self.tol, per_layer=True,
                                    batch_size=self.batch_size, seed=self.seed + i, max_seconds=self.max_seconds,
                                    probe_windows=self.probe_windows)

        return run


def layer_groups(layers: list[str], groups: int) -> list[list[str]]:
    """``layers`` in at most ``groups`` contiguous runs of near-equal length, in order."""
    groups = max(1, min(groups, len(layers)))
    step, extra = divmod(len(layers), groups)
    out, at = [], 0
    for g in range(groups):
        n = step + (g < extra)
        out.append(layers[at : at + n])
        at += n
    return out


def _gather(fn_factory: Any, items: list[Any], layers: list[str], cluster: Cluster,
            progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _, res in map_layers(fn_factory, items, cluster=cluster, progress=progress):
        out.update(res)
    return {n: out[n] for n in layers}  # model order


def measured(spec: ModelSpec, windows: Tensor, layers: list[str], formats: list[str], *, batch_size: int,
             cluster: Cluster, progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """``analysis.measured`` over ``layers``, split across ``cluster.workers`` workers."""
    groups = layer_groups(layers, cluster.workers * GROUPS_PER_WORKER)
    return _gather(MeasuredKL(spec, windows, tuple(formats), batch_size), groups, layers, cluster, progress)


def hessian(spec: ModelSpec, windows: Tensor, layers: list[str], *, max_iter: int, tol: float, batch_size: int,
            seed: int, cluster: Cluster, max_seconds: float | None = None, probe_windows: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """The Hutchinson trace of each layer alone, one layer per call, across ``cluster.workers`` workers."""
    factory = HessianTrace(spec, windows, max_iter, tol, batch_size, seed, max_seconds, probe_windows)
    return _gather(factory, list(enumerate(layers)), layers, cluster, progress)


__all__ = ["GROUPS_PER_WORKER", "HessianTrace", "MeasuredKL", "hessian", "layer_groups", "measured"]
