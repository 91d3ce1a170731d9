"""Dense bit packing: ``n`` unsigned codes of ``b`` bits in ``ceil(n*b/8)`` bytes.

Code ``i`` occupies bits ``i*b`` to ``i*b + b - 1`` of one little-endian bit stream (stream
bit ``k`` is bit ``k % 8`` of byte ``k // 8``); rows follow each other with no padding.

mixq packs its checkpoint itself rather than with compressed-tensors' ``pack_to_int32``:
that packer takes only the signed codes of integer schemes (int8 input, offset by
``2^(b-1)``) and pads every row to a multiple of 32 codes, while mixq's checkpoint holds
the codes of every format (minifloat, NF, log and MX grid indices, integer codes, zero
points) in one layout whose size is exactly the plan's count.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MAX_BITS = 16  # the widest code of any format (fixed point goes to 16 bits)


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """A uint8 tensor holding the unsigned integers ``values`` (each below ``2**bits``), row-major."""
    _check_bits(bits)
    v = values.detach().reshape(-1).cpu()
    if v.is_floating_point() or v.dtype == torch.bool:
        raise ValueError(f"pack_bits takes integer codes, got {v.dtype}")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}]: min {int(v.min())}, max {int(v.max())}")
    as_bytes = v.to(torch.int32).numpy().astype("<u2").view(np.uint8).reshape(-1, 2)  # each code's two bytes, LSB first
    planes = np.unpackbits(as_bytes, axis=1, count=bits, bitorder="little")
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    """The ``count`` integers that ``pack_bits`` stored in ``data`` (uint8 up to 8 bits, else int32)."""
    _check_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_bytes(count, bits):
        raise ValueError(f"expected {packed_bytes(count, bits)} packed bytes for {count} codes of {bits} bits, "
                         f"got {tuple(data.shape)} {data.dtype}")
    planes = np.unpackbits(data.cpu().numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    low = np.packbits(planes, axis=1, bitorder="little")  # [count, ceil(bits / 8)] bytes, LSB first
    if bits <= 8:
        return torch.from_numpy(low.reshape(count))
    return torch.from_numpy(low.view("<u2").reshape(count).astype(np.int32))


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be 1 to {MAX_BITS}, got {bits}")
