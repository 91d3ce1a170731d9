"""One calibration pass over the unquantized model: the Gram matrix of every planned layer's input.

The transformer blocks run in turn on the calibration windows, each on its own full-precision
weights, so every Gram is the base model's whatever is later done to the blocks before it (the
"independent" calibration of a layer database; the sequential pass instead feeds each block the
outputs of the quantized ones).  Layers that read the very same input tensor (q/k/v, gate/up)
share one Gram, found as the sequential pass finds them.  One forward pass per block and batch
accumulates every Gram of the block and gives the next block's inputs; only one block's
activations and Grams are on the device at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from mixq.calibration.gram import Gram
from mixq.calibration.sequential import (Calibration, _call_block, _input_groups, _move_except, capture_inputs,
                                         model_batches)
from mixq.errors import MixqError
from mixq.models import transformer_blocks


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
    prefix, blocks = transformer_blocks(model)
    wanted = list(dict.fromkeys(layers))
    per_block = [{n[len(f"{prefix}.{b}."):]: n for n in wanted if n.startswith(f"{prefix}.{b}.")} for b in range(len(blocks))]
    needed = [b for b, names in enumerate(per_block) if names]
    if not needed:
        return
    home = next(model.parameters()).device
    masks = [mask for _, mask in model_batches(windows, batch_size)]
    _move_except(model, blocks, device)
    try:
        batches = capture_inputs(model, windows, blocks[0], batch_size=batch_size, device=device)
        for b, block in enumerate(blocks[: needed[-1] + 1]):
            block.to(device)
            names = per_block[b]
            groups = _input_groups(block, names, batches[0]) if names else []
            grams: list[Gram | None] = [None] * len(groups)
            mask: list[Tensor | None] = [None]

            def hook(_m: nn.Module, args: tuple, k: int) -> None:
                x = args[0] if mask[0] is None else args[0][mask[0].to(args[0].device)]
                if grams[k] is None:
                    grams[k] = Gram(x.shape[-1], device)
                grams[k].add(x)  # type: ignore[union-attr]

            handles = [block.get_submodule(g[0]).register_forward_pre_hook(lambda m, a, k=k: hook(m, a, k))
                       for k, g in enumerate(groups)]
            try:
                outputs = []
                for (hidden, kwargs), m in zip(batches, masks):
                    mask[0] = m
                    outputs.append((_call_block(block, hidden, kwargs), kwargs))
            finally:
                for h in handles:
                    h.remove()
            batches = outputs if b < needed[-1] else []
            found: dict[str, Tensor] = {}
            for group, gram in zip(groups, grams):
                if gram is None or gram.tokens == 0:
                    raise MixqError(f"layer {names[group[0]]!r} saw no calibration token; cannot calibrate it")
                found.update({names[n]: gram.matrix for n in group})
            if names:
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
