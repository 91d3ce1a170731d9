"""The registry of low-bit kernels: which formats and shapes each serves, and how to build it.

A kernel is named ``<backend>.<kernel>``; ``backend`` is the library it comes from.
``choose_kernel`` picks one for a layer, or gives the reason none serves it; the latency
model and the search ask the same question, so a plan's prediction uses the kernels
``apply_kernels`` would run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.errors import MixqError
from mixq.formats import Format, IntFormat, QTensor
from mixq.runtime import packing
from mixq.runtime.modules import Int8WeightOnlyLinear, TinyGemmLinear, gemlite_linear

BACKENDS = ("auto", "torchao", "gemlite")


class KernelError(MixqError):
    """A kernel that cannot run here, or a plan that needs kernels it cannot have."""


Check = Callable[[Format, tuple[int, int], torch.dtype], "str | None"]
Build = Callable[[IntFormat, QTensor, "Tensor | None", torch.dtype, torch.device], nn.Module]


@dataclass(frozen=True)
class Kernel:
    name: str
    backend: str
    check: Check  # None if it serves (format, (out, in), activation dtype), else why not
    build: Build
    installed: Callable[[], bool]


def _int(fmt: Format) -> IntFormat | None:
    return fmt if isinstance(fmt, IntFormat) and fmt.scheme in ("asym", "sym", "fmin") else None


def _check_tinygemm(fmt: Format, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    f = _int(fmt)
    if f is None or f.bits != 4:
        return f"tinygemm takes 4-bit integer formats, not {fmt.name}"
    rows, cols = shape
    if packing.kernel_group(f, cols, packing.TINYGEMM_GROUPS) is None:
        return f"no tinygemm group size ({'/'.join(map(str, packing.TINYGEMM_GROUPS))}) tiles {fmt.name} on a row of {cols}"
    if packing.tinygemm_inner_k_tiles(cols) is None or rows % packing.TINYGEMM_N_TILE:
        return f"tinygemm needs in_features divisible by 32 and out_features by 8, got {rows}x{cols}"
    if dtype != torch.bfloat16:
        return f"tinygemm runs on bfloat16 activations, the model is {str(dtype).removeprefix('torch.')}"
    return None


def _check_int8(fmt: Format, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    f = _int(fmt)
    if f is None or f.bits != 8 or f.scheme == "fmin" or f.group_size is not None:
        return f"int8 weight-only takes per-channel 8-bit integer formats (asym or sym), not {fmt.name}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"int8 weight-only runs on 16-bit activations, the model is {str(dtype).removeprefix('torch.')}"
    return None


def _check_gemlite(fmt: Format, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    f = _int(fmt)
    if f is None or f.bits not in packing.GEMLITE_BITS or f.scheme == "fmin":
        return f"gemlite takes 8/4/2-bit integer formats with an integer zero point, not {fmt.name}"
    if packing.kernel_group(f, shape[1], None) is None:
        return f"gemlite needs groups divisible by {packing.GEMLITE_ALIGN} that tile a row of {shape[1]} ({fmt.name})"
    if shape[1] % packing.GEMLITE_K_MULTIPLE:
        return f"gemlite needs in_features divisible by {packing.GEMLITE_K_MULTIPLE}, got {shape[1]}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"gemlite runs on 16-bit activations, the model is {str(dtype).removeprefix('torch.')}"
    return None


def _build_tinygemm(fmt, q, bias, dtype, device):
    return TinyGemmLinear(packing.tinygemm_operands(fmt, q), bias, dtype=dtype, device=device)


def _build_int8(fmt, q, bias, dtype, device):
    return Int8WeightOnlyLinear(packing.int8_operands(fmt, q), bias, dtype=dtype, device=device)


def _build_gemlite(fmt, q, bias, dtype, device):
    return gemlite_linear(packing.gemlite_operands(fmt, q), bias, dtype=dtype, device=device)


def gemlite_installed() -> bool:
    return importlib.util.find_spec("gemlite") is not None


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        # tinygemm and the int8 weight-only matmul are PyTorch operators (torchao calls them), so
        # this backend needs no package beyond torch
        Kernel("torchao.int4_tinygemm", "torchao", _check_tinygemm, _build_tinygemm, lambda: True),
        Kernel("torchao.int8_weight_only", "torchao", _check_int8, _build_int8, lambda: True),
        Kernel("gemlite", "gemlite", _check_gemlite, _build_gemlite, gemlite_installed),
    )
}
#: "auto" tries these in order: tinygemm for 4 bits, gemlite (when installed) for 8 and 2 bits,
#: torchao's int8 otherwise (it needs torch.compile to fuse its cast into the matmul)
AUTO_ORDER = ("torchao.int4_tinygemm", "gemlite", "torchao.int8_weight_only")


def candidates(backend: str) -> list[Kernel]:
    if backend not in BACKENDS:
        raise KernelError(f"unknown kernel backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "auto":
        return [KERNELS[n] for n in AUTO_ORDER]
    return [k for k in KERNELS.values() if k.backend == backend]


def choose_kernel(fmt: Format, shape: tuple[int, int], dtype: torch.dtype, backend: str = "auto", *,
                  available: Collection[str] | None = None) -> tuple[Kernel | None, str]:
    """The first kernel of ``backend`` that serves this layer, or None and every kernel's reason.

    ``available`` names the kernels to consider (default: those installed here); the latency
    model passes the kernels its table was measured with.
    """
    reasons = []
    for k in candidates(backend):
        if not (k.installed() if available is None else k.name in available):
            reasons.append(f"{k.name}: not installed (pip install {k.backend})" if available is None else f"{k.name}: not measured")
            continue
        why = k.check(fmt, shape, dtype)
        if why is None:
            return k, ""
        reasons.append(f"{k.name}: {why}")
    return None, "; ".join(reasons)


def serves(fmt: Format, shape: tuple[int, int], backend: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a kernel of ``backend`` runs ``fmt`` on a layer of ``shape`` (installed or not:
    a search space restricted to a target keeps the formats its kernels take)."""
    return any(k.check(fmt, shape, dtype) is None for k in candidates(backend))
