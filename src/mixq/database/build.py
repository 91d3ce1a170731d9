"""Building a layer database: one calibration pass over the base model for the Grams, then each
missing (layer, spec) solved alone (``calibration.independent.solve_layer``, a pure function of the
weight, the spec and the Gram) and appended to the shards as it is done.

The work splits by (layer, spec): any subset of the pairs can be built by any process that has
the model and the calibration windows, into the same folder (shards are written whole and
indexed on the next open).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mixq.calibration.grams import block_grams
from mixq.calibration.independent import solve_layer
from mixq.calibration.sequential import Calibration
from mixq.database.key import DatabaseError
from mixq.database.store import SHARD_BYTES, LayerDatabase
from mixq.layers import read_weight, stored_bits
from mixq.models import transformer_blocks
from mixq.plan import LayerSpec

ENTRY_OVERHEAD = 1024  # bytes per entry beside its weight: its safetensors header line and metadata (measured: ~600)


@dataclass(frozen=True)
class BuildReport:
    built: int  # entries solved and written
    seconds: float  # the calibration pass and the solves
    bytes: int  # estimated bytes they added on disk


def estimate_bytes(model: nn.Module, pairs: Sequence[tuple[str, LayerSpec]]) -> int:
    """Bytes the entries take on disk: each weight in the model's dtype, plus its share of the headers."""
    return sum(read_weight(model, layer).numel() * read_weight(model, layer).element_size() + ENTRY_OVERHEAD
               for layer, _ in pairs)


@torch.no_grad()
def build_database(model: nn.Module, db: LayerDatabase, pairs: Sequence[tuple[str, LayerSpec]], windows: Calibration, *,
                   batch_size: int, device: torch.device | str | None = None, progress: bool = True,
                   shard_bytes: int = SHARD_BYTES) -> BuildReport:
    """Solve and store every pair of ``pairs`` that ``db`` lacks (the model is left unchanged)."""
    missing = db.missing(pairs)
    if not missing:
        return BuildReport(0, 0.0, 0)
    prefix = transformer_blocks(model)[0] + "."
    outside = [layer for layer, _ in missing if not layer.startswith(prefix)]
    if outside:
        raise DatabaseError(f"layer {outside[0]!r} is outside the transformer blocks; a layer database holds the "
                            "layers calibrated inside them (quantize the others with a data-free solver)")
    specs: dict[str, list[LayerSpec]] = {}
    for layer, spec in missing:
        specs.setdefault(layer, []).append(spec)
    start = time.perf_counter()
    bar = tqdm(total=len(missing), desc="layer database", unit="entry", disable=not progress)
    try:
        with db.writer(shard_bytes=shard_bytes) as out:
            for _, grams in block_grams(model, windows, specs, batch_size=batch_size, device=device):
                for layer, gram in grams.items():
                    weight = read_weight(model, layer)
                    w = weight.to(gram.device)
                    for spec in specs[layer]:
                        rec = solve_layer(layer, w, spec, gram)
                        out.add(layer, spec, rec.result.weight.to(weight.dtype), bits=stored_bits(spec, tuple(w.shape)),
                                loss=rec.result.loss, rel_error=rec.rel_error, rtn_rel_error=rec.rtn_rel_error,
                                seconds=rec.seconds)
                        bar.update(1)
    finally:
        bar.close()
    return BuildReport(len(missing), time.perf_counter() - start, estimate_bytes(model, missing))


__all__ = ["BuildReport", "build_database", "estimate_bytes"]
