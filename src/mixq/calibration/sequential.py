"""Calibrated quantization, block by block ("true sequential").

One forward pass of the model per batch of calibration rows records what enters every
transformer block: the first block's hidden states and each block's own other arguments
(attention mask, position embeddings: Gemma's sliding- and full-attention layers get
different ones).  Then each block in turn: its matrices are quantized group by group in
execution order (matrices that read the same input, e.g. q/k/v, form one group and share
one Gram), each group seeing the outputs of the already-quantized groups before it; the
block's outputs on the quantized weights become the next block's inputs.  Only one block's
activations and Grams live on the device at a time.

Stacked experts (transformers' MoE layers, one 3-D parameter per projection): each
expert's matrix is solved on the Gram of the tokens routed to it, read from the arguments
of the experts module (``top_k_index``), so whichever experts implementation the model runs:
the first projection (``gate_up_proj`` or ``up_proj``) on those tokens' hidden states, the
second (``down_proj``) on what they give the expert's activation (``act(gate) * up``,
computed with the already-quantized first projection).  An expert that no calibration
token reaches is solved on the identity Gram, i.e. on the plain weight error ‖W − Ŵ‖² that
round-to-nearest minimises.

Matrices outside the blocks (lm_head, a classification head, a pooler) come last, on the
inputs the quantized model gives them (lm_head: the final norm of the last block's
outputs), one forward pass of the model per batch and group.

Calibration data is either token windows ``[n, seqlen]`` (decoders), or a tokenizer's
batch of ``n`` right-padded sentences (``input_ids``, ``attention_mask``, maybe
``token_type_ids``; encoders): each batch is cut to its longest sentence, the blocks see
the model's attention mask, and padded positions are left out of every Gram.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixq.calibration.gram import Gram
from mixq.errors import MixqError
from mixq.formats import QTensor
from mixq.models import Matrix, matrix_by_name, transformer_blocks
from mixq.plan import LayerSpec
from mixq.solvers import SolveResult, get_solver
from mixq.solvers.rtn import layer_loss, quadratic_form

#: block arguments that carry a key/value cache, dropped from the recorded ones
CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "layer_past", "cache")
#: transformers' stacked experts: the first projection (gate and up concatenated, or up alone), then the second
EXPERT_FIRST = ("gate_up_proj", "up_proj")
EXPERT_SECOND = "down_proj"


class StopForward(Exception):
    """Raised by a hook once the activations it needs have been seen."""


@dataclass(frozen=True)
class LayerRecord:
    name: str  # the matrix: a layer, or one expert of a stacked parameter (``<parameter>.<e>``)
    spec: LayerSpec
    result: SolveResult
    rel_error: float  # ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs
    rtn_rel_error: float  # the same for round-to-nearest on the same format
    seconds: float


@dataclass(frozen=True)
class BlockInputs:
    """What enters the transformer blocks, per batch of calibration rows."""

    hidden: list[Tensor]  # the first block's hidden states
    kwargs: list[list[dict[str, Any]]]  # [block][batch]: the block's other arguments (the model's objects, shared)


Calibration = Tensor | Mapping[str, Tensor]
Run = Callable[[int], object]  # runs batch i through a part of the model


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


def _named_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """The first argument (hidden states) and every other one by name (an encoder block takes its mask positionally)."""
    if not args:
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), kwargs
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise MixqError(f"{type(module).__name__} takes {len(args)} positional arguments; cannot name them")
    return args[0], {**{p.name: a for p, a in zip(params[1:], args[1:])}, **kwargs}


def _call_block(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (when the current device is 0)."""
    def index(d: torch.device) -> int | None:
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index

    return a.type == b.type and (a.type != "cuda" or index(a) == index(b))


@contextmanager
def _blocks_on(blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Each block moved to ``device`` for its forward and back after it, where the blocks live elsewhere."""
    home = next(blocks.parameters()).device
    if _same_device(home, device):
        yield
        return

    def arrive(m: nn.Module, _args: tuple) -> None:  # a hook's return value would replace the block's inputs
        m.to(device)

    def leave(m: nn.Module, _args: tuple, _out: object) -> None:  # ... or its output
        m.to(home)

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(arrive))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        blocks.to(home)


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: Calibration, *, batch_size: int, device: torch.device) -> BlockInputs:
    """What enters every block, recorded in one forward pass of the model per batch (stopped
    at the last block): its arguments are the model's own objects, held once however many
    blocks share them."""
    blocks = transformer_blocks(model)[1]
    hidden: list[Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]

    def hook(i: int, block: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        h, named = _named_arguments(block, args, kw)
        if i == 0:
            hidden.append(h.clone())  # the forward goes on through the blocks: keep what the first was given
        kwargs[i].append({k: v for k, v in named.items() if k not in CACHE_ARGUMENTS})
        if i == len(blocks) - 1:
            raise StopForward

    handles = [b.register_forward_pre_hook(functools.partial(hook, i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with _blocks_on(blocks, device):
            for inputs, _ in model_batches(windows, batch_size):
                try:
                    model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return BlockInputs(hidden, kwargs)


def _first_argument(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _by_module(targets: dict[str, Matrix]) -> dict[int, tuple[nn.Module, list[str]]]:
    out: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in targets.items():
        out.setdefault(id(m.module), (m.module, []))[1].append(name)
    return out


def _input_groups(targets: dict[str, Matrix], run: Callable[[], object]) -> list[list[str]]:
    """Planned matrices grouped by shared input, in execution order (``run`` runs one batch).

    A layer joins the previous layer's group when it reads the very same tensor, unchanged.
    The previous input is held until the next layer runs: once freed, its memory may hold
    the next layer's (different) input at the same address, as o_proj's input and the
    gate/up_proj input of a Llama block often do.  Stacked experts form groups of their
    own, one per projection in the module's order (their inputs are per expert).
    """
    groups: list[list[str]] = []
    seen: set[str] = set()
    last: list[Tensor] = []  # the previous layer's input, kept alive
    version = [0]

    def hook(names: list[str], _m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        fresh = [n for n in names if n not in seen]
        seen.update(fresh)
        if targets[names[0]].stacked:
            groups.extend([n] for n in fresh)
            last.clear()
            return
        x = _first_argument(args, kwargs)
        prev = last[0] if last else None
        same = (prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape
                and x.stride() == prev.stride() and x._version == version[0])
        if fresh and same:
            groups[-1].extend(fresh)
        elif fresh:
            groups.append(fresh)
        last[:] = [x]
        version[0] = x._version

    handles = [module.register_forward_pre_hook(functools.partial(hook, names), with_kwargs=True)
               for module, names in _by_module(targets).values()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in targets if n not in seen]
    if missing:
        raise MixqError(f"layers {', '.join(missing)} never ran on the calibration inputs; solve them with rtn")
    return groups


def _counted(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of ``x`` at the positions that count (a pooler's first-token input: all)."""
    if mask is None:
        return x
    mask = mask.to(x.device)
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if x.dim() == 2 and x.shape[0] == mask.numel():  # flattened tokens (experts)
        return x[mask.reshape(-1)]
    return x


def _expert_inputs(matrix: Matrix, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                   mask: Tensor | None) -> list[Tensor]:
    """Per expert, the rows its ``matrix`` reads: the tokens routed to it through the first
    projection, or their activations through the second."""
    hidden, named = _named_arguments(module, args, kwargs)
    route = named.get("top_k_index")
    if route is None:
        raise MixqError(f"{type(module).__name__}: no top_k_index argument; cannot tell which tokens reach each expert")
    first = next((a for a in EXPERT_FIRST if isinstance(getattr(module, a, None), nn.Parameter)), None)
    if matrix.attr not in (first, EXPERT_SECOND) or first is None:
        raise MixqError(f"{matrix.name}: stacked experts other than {'/'.join(EXPERT_FIRST)} then {EXPERT_SECOND} "
                        "cannot be calibrated; solve them with rtn")
    x = hidden.reshape(-1, hidden.shape[-1])
    route = route.reshape(x.shape[0], -1)
    keep = None if mask is None else mask.to(x.device).reshape(-1)  # the flattened tokens of the batch
    bias = getattr(module, f"{first}_bias", None) if getattr(module, "has_bias", False) else None
    out = []
    for e, part in enumerate(matrix.parts()):
        rows = (route == e).any(dim=-1)
        xe = x[rows if keep is None else rows & keep]
        if matrix.attr == EXPERT_SECOND:
            w1 = Matrix(first, module, first, e, matrix.transposed).get()  # as quantized so far
            y = xe @ w1.T.to(xe.dtype)
            if bias is not None:
                y = y + bias[e]
            xe = module._apply_gate(y) if first == "gate_up_proj" else module.act_fn(y)
        out.append(xe)
    return out


@torch.no_grad()
def _grams(targets: dict[str, Matrix], group: list[str], run: Run, batches: int,
           masks: list[Tensor | None]) -> list[Gram]:
    """The Gram of the input the group's matrices share (stacked experts: one per expert) over
    the positions that count; each batch's forward stops at that input."""
    first = targets[group[0]]
    dim = first.shape[1]
    grams = [Gram(dim, first.param.device) for _ in range(first.count)]
    current: list[Tensor | None] = [None]

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if first.stacked:
            for gram, rows in zip(grams, _expert_inputs(first, module, args, kwargs, current[0])):
                gram.add(rows)
        else:
            gram = grams[0]
            gram.add(_counted(_first_argument(args, kwargs), current[0]))
        raise StopForward

    handle = first.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(batches):
            current[0] = masks[i]
            try:
                run(i)
            except StopForward:
                pass
    finally:
        handle.remove()
    return grams


def _solved_on(gram: Gram) -> Tensor:
    """The matrix a solver gets: the Gram, or the identity where no token came (an expert never routed to)."""
    return gram.matrix if gram.tokens else torch.eye(len(gram.matrix), device=gram.matrix.device)


def _mergeable(spec: LayerSpec) -> bool:
    """Row-independent solves (per-row or per-group grids, no outlier budget) can share one call."""
    opts = spec.opts
    return not spec.format.per_tensor and not opts.get("outliers") and not opts.get("keep_columns")


Member = tuple[Matrix, LayerSpec, Tensor]  # a matrix, its spec and the Gram of its input


def _solve_group(members: list[Member]) -> list[tuple[Member, SolveResult, float]]:
    """Solve each matrix on its Gram; those with the same spec and Gram are stacked along
    rows and solved in one call (q/k/v, gate/up), which is exact for row-independent solvers."""
    parts: dict[Any, list[Member]] = {}
    for member in members:
        m, spec, gram = member
        key = (spec, id(gram)) if _mergeable(spec) else m.name
        parts.setdefault(key, []).append(member)
    out = []
    for same in parts.values():
        _, spec, gram = same[0]
        solver = get_solver(spec.solver)
        weights = [m.get() for m, _, _ in same]
        start = time.perf_counter()
        try:
            result = solver(weights[0] if len(same) == 1 else torch.cat(weights, dim=0), spec.format, gram,
                            solver.options(spec.opts))
        except MixqError as e:
            raise type(e)(f"layers {', '.join(m.name for m, _, _ in same)!r}: {e}") from None
        seconds = (time.perf_counter() - start) / len(same)
        if len(same) == 1:
            out.append((same[0], result, seconds))
            continue
        row = 0
        for member, w in zip(same, weights):
            rows = slice(row, row + w.shape[0])
            row = rows.stop
            q = result.qtensor
            part_q = QTensor(q.fmt, q.codes[rows], {k: v[rows] for k, v in q.params.items()}, q.group_size)
            w_hat = result.weight[rows]
            out.append((member, SolveResult(part_q, w_hat, layer_loss(w, w_hat, gram)), seconds))
    return out


def _relative(loss: float, weight: Tensor, gram: Tensor) -> float:
    ref = quadratic_form(weight, gram)
    return loss / ref if ref > 0 else 0.0


def _quantize_region(targets: dict[str, Matrix], specs: dict[str, LayerSpec], run: Run, batches: int,
                     masks: list[Tensor | None], *, true_sequential: bool) -> list[LayerRecord]:
    """Quantize ``targets`` (the planned matrices of one block, or those outside the blocks)
    group by group, in place; ``run(i)`` runs batch i through that part of the model."""
    rtn = get_solver("rtn")
    groups = _input_groups(targets, lambda: run(0))
    early = None if true_sequential else [_grams(targets, g, run, batches, masks) for g in groups]
    records = []
    for k, group in enumerate(groups):
        grams = [_solved_on(g) for g in (_grams(targets, group, run, batches, masks) if early is None else early[k])]
        members = [(part, specs[n], grams[e] if targets[n].stacked else grams[0])
                   for n in group for e, part in enumerate(targets[n].parts())]
        for (part, spec, gram), result, seconds in _solve_group(members):
            if not torch.isfinite(result.weight).all():
                raise MixqError(f"layer {part.name!r}: {spec.solver} produced NaN/inf; refusing to write it")
            weight = part.get()
            base = rtn(weight, spec.format, gram, rtn.options({}))
            records.append(LayerRecord(part.name, spec, result, _relative(result.loss or 0.0, weight, gram),
                                       _relative(base.loss or 0.0, weight, gram), seconds))
            part.set(result.weight)
        del grams
    return records


@torch.no_grad()
def quantize_sequential_(model: nn.Module, specs: dict[str, LayerSpec], windows: Calibration, *,
                         device: torch.device | str | None = None, batch_size: int = 8,
                         progress: bool = False, log: Callable[[str], None] | None = None,
                         true_sequential: bool = True) -> list[LayerRecord]:
    """Quantize the planned matrices in place: those inside the transformer blocks block by
    block, then those outside them (not the embedding: it reads no activations).

    With ``true_sequential=False`` every Gram of a block is taken before any of its layers
    is quantized (as GPTQ's reference script does without ``--true-sequential``).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks = transformer_blocks(model)[1]
    home = next(model.parameters()).device
    targets = {n: matrix_by_name(model, n) for n in specs}
    inside = [{id(m) for m in block.modules()} for block in blocks]
    per_block = [{n: m for n, m in targets.items() if id(m.module) in ids} for ids in inside]
    outside = {n: m for n, m in targets.items() if not any(id(m.module) in ids for ids in inside)}
    last = max((b for b, t in enumerate(per_block) if t), default=-1)  # no block after it needs inputs
    records: list[LayerRecord] = []
    _move_except(model, blocks, device)  # everything but the blocks; blocks go one at a time
    batches = model_batches(windows, batch_size)
    masks = [mask for _, mask in batches]
    if last >= 0:
        captured = capture_inputs(model, windows, batch_size=batch_size, device=device)
        if log is not None and device.type == "cpu":
            log(_cpu_estimate(blocks[0], captured, windows, last + 1, device))
        records += _quantize_blocks(blocks, per_block[: last + 1], specs, captured, masks, device=device, home=home,
                                    progress=progress, true_sequential=true_sequential)
    if outside:
        inputs = [{k: v.to(device) for k, v in x.items()} for x, _ in batches]
        with _blocks_on(blocks, device):
            records += _quantize_region(outside, specs, lambda i: model(**inputs[i], use_cache=False), len(inputs),
                                        masks, true_sequential=true_sequential)
    model.to(home)
    return records


def _cpu_estimate(block: nn.Module, captured: BlockInputs, windows: Calibration, blocks: int,
                  device: torch.device) -> str:
    block.to(device)
    start = time.perf_counter()
    _call_block(block, captured.hidden[0], captured.kwargs[0][0])
    per_pass = (time.perf_counter() - start) * len(captured.hidden)
    rows, width = _rows(windows)
    what = "windows" if isinstance(windows, Tensor) else "sentences (padded)"
    return (f"calibration on CPU: {rows} {what} x {width} tokens through {blocks} blocks, "
            f"about {per_pass * 5 * blocks / 60:.1f} min of forward passes plus the solvers")


def _quantize_blocks(blocks: nn.ModuleList, per_block: list[dict[str, Matrix]], specs: dict[str, LayerSpec],
                     captured: BlockInputs, masks: list[Tensor | None], *, device: torch.device, home: torch.device,
                     progress: bool, true_sequential: bool) -> list[LayerRecord]:
    """The blocks in turn, up to the last with planned matrices, each fed by the quantized ones before it."""
    hidden = captured.hidden
    records: list[LayerRecord] = []
    for b, targets in enumerate(tqdm(per_block, desc="calibrate", disable=not progress, leave=False)):
        block = blocks[b]
        block.to(device)

        def run(i: int, block: nn.Module = block, kwargs: list[dict[str, Any]] = captured.kwargs[b]) -> Tensor:
            return _call_block(block, hidden[i], kwargs[i])

        if targets:
            records += _quantize_region(targets, specs, run, len(hidden), masks, true_sequential=true_sequential)
        if b + 1 < len(per_block):
            hidden = [run(i) for i in range(len(hidden))]
        block.to(home)
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


__all__ = ["BlockInputs", "Calibration", "LayerRecord", "StopForward", "capture_inputs", "model_batches",
           "quantize_sequential_"]
