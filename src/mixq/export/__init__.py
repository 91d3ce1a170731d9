"""Export: mixq's own packed checkpoint (every format) and compressed-tensors (integer
schemes, for vLLM and transformers); GGUF for llama.cpp lives in ``export/gguf.py``.

``load_export`` reads back either folder: mixq's checkpoint through its manifest, a
pack-quantized compressed-tensors folder through compressed-tensors' decompressor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mixq.export.checkpoint import export_checkpoint, is_checkpoint, load_checkpoint
from mixq.export.report import ExportReport
from mixq.models import LoadedModel, ModelSource


def is_compressed_tensors(path: str | os.PathLike) -> bool:
    """A folder whose config.json declares a pack-quantized compressed-tensors checkpoint."""
    config = Path(path) / "config.json"
    try:
        q = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized"


def exported_format(path: str | os.PathLike) -> str | None:
    """``"mixq"``, ``"compressed-tensors"``, or None for any other path."""
    if not Path(path).is_dir():
        return None
    if is_checkpoint(path):
        return "mixq"
    return "compressed-tensors" if is_compressed_tensors(path) else None


def load_export(source: str | os.PathLike | ModelSource, *, dtype: str | None = None,
                device: str = "cpu") -> LoadedModel:
    """The model an exported folder holds (its export dtype unless ``dtype`` is given)."""
    path = source.path if isinstance(source, ModelSource) else Path(source)
    if exported_format(path) == "compressed-tensors":
        from mixq.export.compressed_tensors import load_compressed_tensors

        return load_compressed_tensors(source, dtype=dtype, device=device)
    return load_checkpoint(source, dtype=dtype, device=device)


__all__ = ["ExportReport", "export_checkpoint", "exported_format", "is_checkpoint", "is_compressed_tensors",
           "load_checkpoint", "load_export"]
