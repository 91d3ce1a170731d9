"""One calibration pass over the unquantized model: the Gram matrix of every planned layer's input.

The transformer blocks run in turn on the calibration windows, each on its own full-precision
weights, so every Gram is the base model's whatever is later done to the blocks before it (the
"independent" calibration of a layer database; the sequential pass instead feeds each block the
outputs of the quantized ones).  Layers that read the very same input tensor (q/k/v, gate/up)
share one Gram, found as the sequential pass finds them, with the sequential pass's own
machinery (each block's own arguments, padding left out).  Only one block's activations and
Grams are on the device at a time.  2-D matrices only: stacked experts are solved sequentially.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from mixq.calibration.sequential import (Calibration, _call_block, _grams, _input_groups, _move_except,
                                         capture_inputs, model_batches)
from mixq.errors import MixqError
from mixq.models import matrix_by_name, transformer_blocks


@torch.no_grad()
def block_grams(model: nn.Module, windows: Calibration, layers: Iterable[str], *, batch_size: int,
                device: torch.device | str | None = None) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """``(block index, {layer: Gram})`` for each block holding one of ``layers``, in order.

    The Grams are fp32 on ``device`` (default: the model's); layers sharing an input share the
    tensor.  A block's outputs are computed before its Grams are yielded, so the caller may
    quantize that block's layers at once: the blocks after it still see base-model inputs.
    Blocks after the last one needed are not run.  Layers outside the blocks have no Gram here.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks = transformer_blocks(model)[1]
    targets = {n: matrix_by_name(model, n) for n in dict.fromkeys(layers)}
    stacked = [n for n, m in targets.items() if m.stacked]
    if stacked:
        raise MixqError(f"{stacked[0]!r}: stacked experts are solved sequentially (one Gram per expert's routed "
                        "tokens), not on base-model Grams")
    inside = [{id(m) for m in block.modules()} for block in blocks]
    per_block = [{n: m for n, m in targets.items() if id(m.module) in ids} for ids in inside]
    needed = [b for b, t in enumerate(per_block) if t]
    if not needed:
        return
    home = next(model.parameters()).device
    masks = [mask for _, mask in model_batches(windows, batch_size)]
    _move_except(model, blocks, device)
    try:
        captured = capture_inputs(model, windows, batch_size=batch_size, device=device)
        hidden = captured.hidden
        for b in range(needed[-1] + 1):
            block = blocks[b]
            block.to(device)

            def run(i: int, block: nn.Module = block, kwargs: list[dict[str, Any]] = captured.kwargs[b]) -> Tensor:
                return _call_block(block, hidden[i], kwargs[i])

            found: dict[str, Tensor] = {}
            if per_block[b]:
                for group in _input_groups(per_block[b], lambda: run(0)):
                    gram = _grams(per_block[b], group, run, len(hidden), masks)[0]
                    if gram.tokens == 0:
                        raise MixqError(f"layer {group[0]!r} saw no calibration token; cannot calibrate it")
                    found.update({n: gram.matrix.to(device) for n in group})
            if b < needed[-1]:
                hidden = [run(i) for i in range(len(hidden))]  # on the base weights: the caller has not touched them
            if found:
                yield b, found
            block.to(home)
    finally:
        model.to(home)


def collect_grams(model: nn.Module, windows: Calibration, layers: Iterable[str], *, batch_size: int,
                  device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Every Gram of ``block_grams`` at once (all on ``device``)."""
    return {n: g for _, grams in block_grams(model, windows, layers, batch_size=batch_size, device=device)
            for n, g in grams.items()}


__all__ = ["block_grams", "collect_grams"]
