"""Block-by-block calibrated quantization ("true sequential").

The inputs of the first transformer block are captured on the calibration windows; then
each block in turn: its Linear layers are quantized group by group in execution order
(layers that read the same input, e.g. q/k/v, form one group and share one Gram), each
group seeing the outputs of the already-quantized groups before it; the block's outputs
on the quantized weights become the next block's inputs.  Only one block's activations
and Grams live on the device at a time.

Calibration data is either token windows ``[n, seqlen]`` (decoders), or a tokenizer's
batch of ``n`` right-padded sentences (``input_ids``, ``attention_mask``, maybe
``token_type_ids``; encoders): each batch is cut to its longest sentence, the block sees
the model's attention mask, and padded positions are left out of every Gram.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.calibration.gram import Gram
from mixq.errors import MixqError
from mixq.models import transformer_blocks
from mixq.plan import LayerSpec
from mixq.formats import QTensor
from mixq.solvers import SolveResult, get_solver
from mixq.solvers.rtn import layer_loss


class StopForward(Exception):
    """Raised by a hook once the activations it needs have been seen."""


@dataclass(frozen=True)
class LayerRecord:
    name: str
    spec: LayerSpec
    result: SolveResult
    rel_error: float  # ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs
    rtn_rel_error: float  # the same for round-to-nearest on the same format
    seconds: float


Batch = tuple[Tensor, dict[str, Any]]
Calibration = Tensor | Mapping[str, Tensor]


def model_batches(calibration: Calibration, batch_size: int) -> list[tuple[dict[str, Tensor], Tensor | None]]:
    """(model inputs, mask of the positions that count or None) per batch of rows."""
    if isinstance(calibration, Tensor):
        return [({"input_ids": calibration[i : i + batch_size]}, None) for i in range(0, len(calibration), batch_size)]
    if "input_ids" not in calibration or "attention_mask" not in calibration:
        raise MixqError("calibration sentences need 'input_ids' and an 'attention_mask'")
    n = len(calibration["input_ids"])
    out = []
    for i in range(0, n, batch_size):
        mask = calibration["attention_mask"][i : i + batch_size].bool()
        width = int(mask.sum(dim=1).max())  # right padding: the longest sentence's length
        inputs = {k: v[i : i + batch_size, :width] for k, v in calibration.items()}
        out.append((inputs, mask[:, :width]))
    return out


def _rows(calibration: Calibration) -> tuple[int, int]:
    ids = calibration if isinstance(calibration, Tensor) else calibration["input_ids"]
    return int(ids.shape[0]), int(ids.shape[1])


def _named_arguments(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """The hidden states and every other argument by name (an encoder block takes its mask positionally)."""
    if not args:
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), kwargs
    params = [p for p in inspect.signature(block.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise MixqError(f"{type(block).__name__} takes {len(args)} positional arguments; cannot name them")
    return args[0], {**{p.name: a for p, a in zip(params[1:], args[1:])}, **kwargs}


def _call_block(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: Calibration, block: nn.Module, *, batch_size: int,
                   device: torch.device) -> list[Batch]:
    """(hidden states, keyword arguments) entering ``block``, one entry per batch of windows."""
    captured: list[Batch] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden, named = _named_arguments(block, args, kwargs)
        kw = {k: v for k, v in named.items() if k not in ("past_key_value", "past_key_values")}
        captured.append((hidden, kw))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for inputs, _ in model_batches(windows, batch_size):
            try:
                model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _input_groups(block: nn.Module, names: dict[str, str], batch: Batch) -> list[list[str]]:
    """Planned layers of a block grouped by shared input, in execution order.

    A layer joins the previous layer's group when it reads the very same tensor, unchanged.
    The previous input is held until the next layer runs: once freed, its memory may hold
    the next layer's (different) input at the same address, as o_proj's input and the
    gate/up_proj input of a Llama block often do.
    """
    groups: list[list[str]] = []
    last: list[Tensor] = []  # the previous layer's input, kept alive
    version = [0]

    def hook(_m: nn.Module, args: tuple, n: str) -> None:
        x = args[0]
        prev = last[0] if last else None
        same = (prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape
                and x.stride() == prev.stride() and x._version == version[0])
        if same:
            groups[-1].append(n)
        else:
            groups.append([n])
        last[:] = [x]
        version[0] = x._version

    handles = [module.register_forward_pre_hook(lambda m, args, n=n: hook(m, args, n))
               for n, module in block.named_modules() if n in names]
    try:
        _call_block(block, *batch)
    finally:
        for h in handles:
            h.remove()
    return groups


@torch.no_grad()
def _gram(block: nn.Module, group: list[str], batches: list[Batch], masks: list[Tensor | None] | None = None) -> Gram:
    """The Gram of the input shared by a group's layers over the positions that count
    (``masks``, one per batch; None: all); the forward stops at that input."""
    first = block.get_submodule(group[0])
    gram = Gram(first.in_features, first.weight.device)
    masks = masks or [None] * len(batches)
    current: list[Tensor | None] = [None]

    def hook(_m: nn.Module, args: tuple) -> None:
        x, mask = args[0], current[0]
        gram.add(x if mask is None else x[mask.to(x.device)])
        raise StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        for batch, mask in zip(batches, masks):
            current[0] = mask
            try:
                _call_block(block, *batch)
            except StopForward:
                pass
    finally:
        handle.remove()
    return gram


def _mergeable(spec: LayerSpec) -> bool:
    """Row-independent solves (per-row or per-group grids, no outlier budget) can share one call."""
    opts = spec.opts
    return not spec.format.per_tensor and not opts.get("outliers") and not opts.get("keep_columns")


def _solve_group(layers: list[tuple[str, nn.Module]], specs: dict[str, LayerSpec],
                 gram: Tensor) -> list[tuple[str, nn.Module, SolveResult, float]]:
    """Solve the layers that read one input; those with the same spec are stacked along
    rows and solved in one call (q/k/v, gate/up), which is exact for row-independent solvers."""
    parts: dict[Any, list[tuple[str, nn.Module]]] = {}
    for full, layer in layers:
        key = specs[full] if _mergeable(specs[full]) else full
        parts.setdefault(key, []).append((full, layer))
    out = []
    for members in parts.values():
        spec = specs[members[0][0]]
        solver = get_solver(spec.solver)
        weight = torch.cat([layer.weight.data for _, layer in members], dim=0)
        start = time.perf_counter()
        try:
            result = solver(weight, spec.format, gram, solver.options(spec.opts))
        except MixqError as e:
            raise type(e)(f"layers {', '.join(f for f, _ in members)!r}: {e}") from None
        seconds = (time.perf_counter() - start) / len(members)
        row = 0
        for full, layer in members:
            rows = slice(row, row + layer.weight.shape[0])
            row = rows.stop
            if len(members) == 1:
                out.append((full, layer, result, seconds))
                continue
            q = result.qtensor
            part_q = QTensor(q.fmt, q.codes[rows], {k: v[rows] for k, v in q.params.items()}, q.group_size)
            w_hat = result.weight[rows]
            out.append((full, layer, SolveResult(part_q, w_hat, layer_loss(layer.weight.data, w_hat, gram)), seconds))
    return out


def _relative(loss: float, weight: Tensor, gram: Tensor) -> float:
    w = weight.float()
    ref = float(((w @ gram) * w).sum())
    return loss / ref if ref > 0 else 0.0


@torch.no_grad()
def quantize_sequential_(model: nn.Module, specs: dict[str, LayerSpec], windows: Calibration, *,
                         device: torch.device | str | None = None, batch_size: int = 8,
                         progress: bool = False, log: Callable[[str], None] | None = None,
                         true_sequential: bool = True) -> list[LayerRecord]:
    """Quantize the planned layers inside the transformer blocks, in place, block by block.

    With ``true_sequential=False`` every Gram of a block is taken before any of its layers
    is quantized (as GPTQ's reference script does without ``--true-sequential``).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix, blocks = transformer_blocks(model)
    home = next(model.parameters()).device
    rtn = get_solver("rtn")
    records: list[LayerRecord] = []
    _move_except(model, blocks, device)  # everything but the blocks; blocks go one at a time
    batches = capture_inputs(model, windows, blocks[0], batch_size=batch_size, device=device)
    masks = [mask for _, mask in model_batches(windows, batch_size)]
    if log is not None and device.type == "cpu":
        blocks[0].to(device)
        start = time.perf_counter()
        _call_block(blocks[0], *batches[0])
        per_pass = (time.perf_counter() - start) * len(batches)
        rows, width = _rows(windows)
        what = "windows" if isinstance(windows, Tensor) else "sentences (padded)"
        log(f"calibration on CPU: {rows} {what} x {width} tokens through {len(blocks)} blocks, "
            f"about {per_pass * 5 * len(blocks) / 60:.1f} min of forward passes plus the solvers")
    for b, block in enumerate(tqdm(blocks, desc="calibrate", disable=not progress, leave=False)):
        block.to(device)
        block_prefix = f"{prefix}.{b}."
        names = {n[len(block_prefix):]: n for n in specs if n.startswith(block_prefix)}
        if names:
            groups = _input_groups(block, names, batches[0])
            early = None if true_sequential else [_gram(block, g, batches, masks).matrix for g in groups]
            for k, group in enumerate(groups):
                gram = _gram(block, group, batches, masks).matrix if early is None else early[k]
                layers = [(names[n], block.get_submodule(n)) for n in group]
                for full, layer, result, seconds in _solve_group(layers, specs, gram):
                    if not torch.isfinite(result.weight).all():
                        raise MixqError(f"layer {full!r}: {specs[full].solver} produced NaN/inf; refusing to write it")
                    spec = specs[full]
                    base = rtn(layer.weight.data, spec.format, gram, rtn.options({}))
                    records.append(LayerRecord(full, spec, result, _relative(result.loss or 0.0, layer.weight.data, gram),
                                               _relative(base.loss or 0.0, layer.weight.data, gram), seconds))
                    layer.weight.data.copy_(result.weight.to(layer.weight.dtype))
                del gram
        batches = [(_call_block(block, h, kw), kw) for h, kw in batches]
        block.to(home)
    model.to(home)
    return records


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())


def _move_except(module: nn.Module, keep: nn.Module, device: torch.device) -> None:
    for child in module.children():
        if child is keep:
            continue
        if _contains(child, keep):
            _move_except(child, keep, device)
        else:
            child.to(device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for n, buf in module.named_buffers(recurse=False):
        setattr(module, n, buf.to(device))


__all__ = ["Calibration", "LayerRecord", "StopForward", "capture_inputs", "model_batches", "quantize_sequential_"]
