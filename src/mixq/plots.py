"""Weight-distribution plots: the original and the dequantised weights of chosen layers,
overlaid (log-scaled counts), and the error histogram, as the fourth seed plots absmax and
zero-point GPT-2.

One row of two panels per layer (or one row for all of them with ``pool``).  The left panel
marks the grid levels the quantized weights use, found from the dequantised values, so any
format works: for a per-tensor format the one grid of the whole layer; for per-channel and
per-group formats, whose grid differs from group to group, the levels of one group, the one
holding the layer's largest |w| (the coarsest grid); weights kept in 16 bits as outliers
are left out.  Pooled layers have different grids: no level is marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mixq.errors import MixqError, PlanError
from mixq.plan import Plan, matches

BINS = 200  # histogram bins of each panel
MAX_LAYERS = 16  # rows of one figure; more layers are plotted pooled (``pool``)
MAX_LEVELS = 256  # more distinct levels than an 8-bit grid has are not marked
WIDTH_IN, ROW_IN, DPI = 12.0, 3.0, 100  # figure inches (width, per row) and dots per inch


def _weight(model: nn.Module, name: str) -> Tensor:
    """The [out, in] weight of a layer, as float32 on the CPU."""
    from mixq.models import matrix_by_name

    return matrix_by_name(model, name).get().detach().float().cpu()


def select_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """The layers (model order) named by ``patterns`` (names or ``re:`` regexes matched against
    the whole name); a pattern matching no layer is an error naming it."""
    from mixq.models import candidate_matrices

    linears, extras = candidate_matrices(model)
    names = list(linears) + [n for n in extras if n not in linears]
    if not patterns:
        raise MixqError("choose the layers to plot: --layer NAME or --layer 're:PATTERN'")
    for p in patterns:
        if not any(matches(p, n) for n in names):
            raise MixqError(f"--layer {p!r} matches none of the model's {len(names)} layers "
                            f"(e.g. {', '.join(names[:2])}; a pattern needs 're:' and matches the whole name)")
    return [n for n in names if any(matches(p, n) for p in patterns)]


@dataclass(frozen=True)
class Panel:
    """What one row of the figure shows."""

    layers: tuple[str, ...]
    formats: tuple[str, ...]
    original: Tensor  # 1-D, every weight of the layers
    dequantized: Tensor
    levels: Tensor | None
    levels_note: str

    def summary(self, edges: Tensor, counts: dict[str, Tensor]) -> dict[str, Any]:
        err = self.dequantized - self.original
        return {"layers": list(self.layers), "formats": list(self.formats), "weights": self.original.numel(),
                "original": _stats(self.original), "dequantized": _stats(self.dequantized),
                "error": {"rms": float(err.pow(2).mean().sqrt()), "max_abs": float(err.abs().max())},
                "levels": None if self.levels is None else self.levels.tolist(), "levels_note": self.levels_note,
                "edges": edges.tolist(), "counts": {k: v.long().tolist() for k, v in counts.items()}}


def _stats(x: Tensor) -> dict[str, float]:
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}


def _levels(w: Tensor, q: Tensor, outliers: Tensor | None, per_tensor: bool, group: int) -> tuple[Tensor | None, str]:
    """The grid levels a quantized layer uses, and what they are (see the module's docstring)."""
    kept = torch.ones_like(q, dtype=torch.bool) if outliers is None else outliers.cpu() == 0
    if per_tensor:
        values, note = q[kept], "grid levels of the layer (per tensor)"
    else:
        row, col = divmod(int(w.abs().argmax()), w.shape[1])
        start = col // group * group
        end = min(start + group, w.shape[1])
        values = q[row, start:end][kept[row, start:end]]
        note = (f"levels of one group: row {row}, columns {start}-{end - 1}, the group of the largest |w| "
                "(every group has its own grid)")
    levels = torch.unique(values)
    if len(levels) > MAX_LEVELS:
        return None, f"{len(levels)} distinct levels: not marked"
    return levels, note


def _panels(base: nn.Module, quantized: nn.Module, result: Any, names: list[str], pool: bool) -> list[Panel]:
    panels = []
    for name in names:
        layer = result.layers[name]
        w, q = _weight(base, name), _weight(quantized, name)
        levels, note = _levels(w, q, layer.outliers, layer.spec.format.per_tensor, layer.qtensor.group_size)
        panels.append(Panel((name,), (layer.spec.format.name,), w.flatten(), q.flatten(), levels, note))
    if not pool or len(panels) == 1:
        return panels
    formats = tuple(dict.fromkeys(f for p in panels for f in p.formats))
    return [Panel(tuple(names), formats, torch.cat([p.original for p in panels]),
                  torch.cat([p.dequantized for p in panels]), None,
                  f"{len(names)} layers pooled, each with its own grid: no level marked")]


def plot_weights(model: nn.Module, plan: Plan, layers: list[str], out: str | Path, *,
                 calibration: Tensor | None = None, pool: bool = False, bins: int = BINS,
                 device: str | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Quantize a copy of ``model`` with ``plan``, plot the chosen layers' weights (see the
    module's docstring) into one PNG at ``out``; returns what was plotted: per panel the
    layers, formats, weight statistics, levels marked and histogram counts, and the image size."""
    from mixq.quantize import quantized_copy

    if bins < 2:
        raise MixqError(f"--bins must be at least 2, got {bins}")
    names = select_layers(model, layers)
    if len(names) > MAX_LAYERS and not pool:
        raise MixqError(f"--layer matches {len(names)} layers; one figure plots at most {MAX_LAYERS} rows: "
                        "narrow the pattern or pool them (--pool)")
    with quantized_copy(model, plan, calibration=calibration, device=device, batch_size=batch_size) as (qmodel, result):
        missing = [n for n in names if result is None or n not in result.layers]
        if missing:
            raise PlanError(f"plan {plan.describe()!r} leaves {missing[0]!r} unquantized: nothing to compare")
        panels = _panels(model, qmodel, result, names, pool)
    return _draw(panels, Path(out), bins, plan.describe())


def _draw(panels: list[Panel], out: Path, bins: int, plan: str) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(WIDTH_IN, ROW_IN * len(panels)), dpi=DPI, squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]})
    summaries = []
    for p, (left, right) in zip(panels, axes):
        lo = float(torch.minimum(p.original.min(), p.dequantized.min()))
        hi = float(torch.maximum(p.original.max(), p.dequantized.max()))
        edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        counts = {"original": torch.histogram(p.original, edges).hist,
                  "dequantized": torch.histogram(p.dequantized, edges).hist}
        err = p.dequantized - p.original
        e = float(err.abs().max()) or 1.0
        err_edges = torch.linspace(-e, e, bins + 1)
        counts["error"] = torch.histogram(err, err_edges).hist
        left.stairs(counts["original"].numpy(), edges.numpy(), fill=True, alpha=0.5, label="original")
        left.stairs(counts["dequantized"].numpy(), edges.numpy(), fill=True, alpha=0.5, label="dequantised")
        if p.levels is not None:
            for v in p.levels.tolist():
                left.axvline(v, color="0.3", lw=0.5, alpha=0.5)
        left.set_yscale("log")
        title = p.layers[0] if len(p.layers) == 1 else f"{len(p.layers)} layers ({p.layers[0]} ...)"
        left.set_title(f"{title} · {', '.join(p.formats)}", fontsize=9)
        left.set_xlabel(f"weight (lines: {p.levels_note})" if p.levels is not None else f"weight ({p.levels_note})",
                        fontsize=8)
        left.set_ylabel("count (log)")
        left.legend(fontsize=8)
        right.stairs(counts["error"].numpy(), err_edges.numpy(), fill=True, color="C3", alpha=0.7)
        right.set_yscale("log")
        right.set_title(f"error (dequantised − original), rms {float(err.pow(2).mean().sqrt()):.3g}", fontsize=9)
        right.set_xlabel("error")
        summaries.append(p.summary(edges, counts) | {"error_edges": err_edges.tolist()})
    fig.suptitle(f"weights under plan {plan}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    width, height = (int(round(v)) for v in fig.get_size_inches() * DPI)
    plt.close(fig)
    return {"out": str(out), "plan": plan, "width": width, "height": height, "panels": summaries}


__all__ = ["BINS", "MAX_LAYERS", "plot_weights", "select_layers"]
