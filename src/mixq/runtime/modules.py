"""Linear layers that keep packed low-bit weights and call a kernel in ``forward``.

Each is built from a layer's solved codes (``QTensor``) and keeps no float weight:

* ``TinyGemmLinear``: torchao's int4 weight-only kernel (tinygemm), which torchao calls as
  ``aten._weight_int4pack_mm`` on CUDA (bfloat16 activations) and PyTorch also ships for
  CPU (``_weight_int4pack_mm_for_cpu``, another packed layout; used by the CPU tests).
* ``Int8WeightOnlyLinear``: torchao's weight-only int8 (``Int8Tensor``): a matmul on the
  cast codes, then the channel scale; it can only beat 16 bits where ``torch.compile`` fuses
  the cast into the matmul (torchao's benchmarks run it compiled).
* gemlite's ``GemLiteLinearTriton`` (Triton), built by ``gemlite_linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixq.runtime.packing import (
    GemliteOperands,
    Int8Operands,
    TinyGemmOperands,
    tinygemm_inner_k_tiles,
    tinygemm_nibbles,
    tinygemm_scale_and_zero,
)


class TinyGemmLinear(nn.Module):
    def __init__(self, ops: TinyGemmOperands, bias: Tensor | None, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        rows, cols = ops.codes.shape
        tiles = tinygemm_inner_k_tiles(cols)
        if tiles is None:
            raise ValueError(f"tinygemm needs in_features divisible by 32, got {cols}")
        self.in_features, self.out_features, self.group = cols, rows, ops.group
        codes = ops.codes.to(device)
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_nibbles(codes).contiguous(), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), tiles)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", tinygemm_scale_and_zero(ops, dtype).to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, dtype))
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        if flat.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scale_and_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_and_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, kernel=tinygemm"


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, ops: Int8Operands, bias: Tensor | None, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.out_features, self.in_features = ops.codes.shape
        self.register_buffer("codes", ops.codes.to(device))
        self.register_buffer("zero", ops.zero.to(device, dtype))
        self.register_buffer("scale", ops.scale.to(device, dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, dtype))

    def forward(self, x: Tensor) -> Tensor:
        w = self.codes.to(x.dtype) - self.zero[:, None]  # integers within ±255: exact in 16-bit floats
        y = torch.nn.functional.linear(x, w) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=int8_weight_only"


def gemlite_linear(ops: GemliteOperands, bias: Tensor | None, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A ``GemLiteLinearTriton`` holding ``ops`` packed, parameters in ``dtype`` (gemlite's
    ``A16Wn`` helper, with ``fma_mode=False`` so it computes ``(W_q - zeros) * scales``)."""
    import gemlite

    dt = gemlite.DType.BF16 if dtype == torch.bfloat16 else gemlite.DType.FP16
    rows, cols = ops.codes.shape
    layer = gemlite.GemLiteLinearTriton(ops.bits, group_size=ops.group, in_features=cols, out_features=rows,
                                        input_dtype=dt, output_dtype=dt, scaled_activations=False)
    layer.pack(ops.codes.to(device), ops.scale.to(device, dtype), ops.zero.to(device, dtype),
               bias=None if bias is None else bias.detach().to(device, dtype), fma_mode=False)
    if ops.group == cols:  # one group a row: grouped dequantisation, no output scaling (as A16Wn does)
        layer.W_group_mode, layer.channel_scale_mode = 3, 0
    return layer
