"""Kernel modules on CUDA against the fake-quant Linear, per layer (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

from mixq.formats import parse_format
from mixq.plan import LayerSpec, Plan
from mixq.quantize import quantize_
from mixq.runtime import KERNELS, apply_kernels, plan_kernels
from mixq.runtime.kernels import gemlite_installed
from mixq.runtime.packing import gemlite_dequantize, gemlite_operands, tinygemm_dequantize, tinygemm_operands

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CASES = [  # (kernel, format, out, in)
    ("torchao.int4_tinygemm", "int4-g128", 256, 4096),
    ("torchao.int4_tinygemm", "int4-g32", 192, 576),
    ("torchao.int4_tinygemm", "int4-g128", 192, 576),  # tail group of 64
    ("torchao.int4_tinygemm", "int4-sym-g64", 256, 1024),
    ("torchao.int4_tinygemm", "int4", 128, 2048),
    ("torchao.int4_tinygemm", "int4-fmin-g32", 128, 1536),
    ("torchao.int8_weight_only", "int8", 256, 4096),
    ("torchao.int8_weight_only", "int8-sym", 192, 576),
    ("gemlite", "int8", 256, 4096),
    ("gemlite", "int4-g128", 256, 4096),
    ("gemlite", "int4", 256, 1024),
    ("gemlite", "int2-g64", 256, 2048),
    ("gemlite", "int8-g128", 256, 1024),
]


def _kernel_weight(kernel: str, fmt, q, dtype) -> torch.Tensor:
    """The weights the kernel multiplies by (its documented rounding), float32."""
    if kernel == "torchao.int4_tinygemm":
        return tinygemm_dequantize(tinygemm_operands(fmt, q), dtype).float()
    if kernel == "gemlite":
        return gemlite_dequantize(gemlite_operands(fmt, q), dtype).float()
    return fmt.dequantize(q)  # int8: integer part exact, the scale applied to the output


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize(("kernel", "name", "rows", "cols"), CASES)
def test_kernel_matches_fake_quant_linear(kernel, name, rows, cols, batch):
    if kernel == "gemlite" and not gemlite_installed():
        pytest.skip("gemlite is not installed")
    torch.manual_seed(0)
    dtype = torch.bfloat16
    fmt = parse_format(name)
    w = torch.randn(rows, cols, device="cuda") * 0.02
    q = fmt.quantize(w)
    bias = torch.randn(rows, device="cuda", dtype=dtype)
    module = KERNELS[kernel].build(fmt, q, bias, dtype, torch.device("cuda"))
    x = torch.randn(batch, cols, device="cuda", dtype=dtype)
    y = module(x).float()
    fake = torch.nn.functional.linear(x, fmt.dequantize(q).to(dtype), bias).float()  # the fake-quant Linear
    wk = _kernel_weight(kernel, fmt, q, dtype)
    exact = x.float() @ wk.T + bias.float()
    mag = x.float().abs() @ wk.abs().T + bias.float().abs()
    # accumulation order and the bf16 output: a few bf16 ulps of the magnitude
    assert ((y - exact).abs() <= 2**-6 * mag + 1e-6).all(), (y - exact).abs().max()
    # against fake-quant: the same plus the kernel's weight rounding (its scale/zero in bf16)
    w_gap = (wk - fmt.dequantize(q).to(dtype).float()).abs()
    gap = x.float().abs() @ w_gap.T
    assert ((y - fake).abs() <= gap + 2**-6 * mag + 1e-6).all()
    assert (y - fake).abs().max() <= 0.05 * fake.abs().max()  # and small in absolute terms


def test_apply_kernels_model_logits_match_fake_quant():
    from conftest import tiny_llama

    model = tiny_llama(tie=False, vocab=304).to("cuda", torch.bfloat16)
    plan = Plan(rules=(("re:.*mlp\\.down_proj", LayerSpec.of("int8")), ("re:.*self_attn\\.o_proj", LayerSpec.of("int3-g32"))),
                default=LayerSpec.of("int4-g32"))
    q = quantize_(model, plan)
    fake = copy.deepcopy(model)
    report = apply_kernels(model, q.layers, backend="torchao")
    assert report.counts() == {"torchao.int4_tinygemm": 10, "torchao.int8_weight_only": 2}
    assert set(report.fallback) == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "TinyGemmLinear"
    assert isinstance(model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    ids = torch.randint(0, 304, (2, 17), device="cuda")
    with torch.no_grad():
        a, b = model(ids).logits.float(), fake(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    assert plan_kernels(fake, q.layers, backend="torchao").served == report.served


def test_required_lists_unserved_layers():
    from conftest import tiny_llama

    from mixq.runtime import KernelError

    model = tiny_llama(tie=False, vocab=304).to("cuda", torch.bfloat16)
    q = quantize_(model, Plan.uniform("int3-g32"))
    with pytest.raises(KernelError, match=r"no torchao kernel serves 14 layer\(s\)"):
        apply_kernels(model, q.layers, backend="torchao", required=True)
