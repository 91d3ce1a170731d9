"""What an export wrote: where, how big against the plan's count, and what it changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ExportReport:
    format: str  # "mixq" or "compressed-tensors"
    out: Path
    plan_bytes: int  # Plan.size_bytes: what the plan counts (other tensors at 16 bits)
    tensor_bytes: int  # the safetensors files on disk (tensor data and headers)
    other_bytes: int  # every other file (config, manifest, tokenizer)
    layers: int  # quantized layers written packed
    fallback: tuple[str, ...] = ()  # layers written in 16 bits instead (--fallback-16bit)
    notes: tuple[str, ...] = ()  # what a loader should know (serving caveats, wide tensors)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        """Tensor files on disk over the plan's computed size."""
        return self.tensor_bytes / self.plan_bytes if self.plan_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "out": str(self.out), "plan_bytes": self.plan_bytes,
                "tensor_bytes": self.tensor_bytes, "other_bytes": self.other_bytes, "size_ratio": self.size_ratio,
                "layers": self.layers, "fallback_16bit": list(self.fallback), "notes": list(self.notes), **self.extra}


def split_sizes(folder: Path) -> tuple[int, int]:
    """(bytes of the .safetensors files, bytes of every other file) in ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    tensors = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return tensors, sum(p.stat().st_size for p in files) - tensors
