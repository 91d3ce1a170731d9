"""What every JSON result records about how it was made."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from importlib import metadata
from typing import Any

import torch


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def provenance(*, model: dict[str, str] | None, seed: int, device: str | torch.device,
               command: str | None = None) -> dict[str, Any]:
    from mixq import __version__

    return {
        "mixq": __version__,
        "versions": {p: _version(p) for p in ("torch", "transformers", "accelerate", "gguf", "safetensors", "lm_eval")},
        "python": platform.python_version(),
        "model": model,
        "seed": seed,
        "device": device_name(device),
        "command": command or shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
