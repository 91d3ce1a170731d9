"""What every JSON result records about how it was made."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from importlib import metadata
from typing import Any

import torch


def versions(*packages: str) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


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
        "versions": versions("torch", "transformers", "accelerate", "gguf", "safetensors", "lm_eval"),
        "python": platform.python_version(),
        "model": model,
        "seed": seed,
        "device": device_name(device),
        "command": command or shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
