"""Which kernel serves which layer, the report, and the errors (CPU)."""

from __future__ import annotations

import pytest
import torch

from mixq.plan import LayerSpec, Plan
from mixq.quantize import quantize_
from mixq.runtime import KernelError, apply_kernels, choose_kernel, plan_kernels, serves
from mixq.formats import parse_format
from conftest import tiny_llama


def _quantized(plan: Plan, dtype=torch.bfloat16):
    model = tiny_llama(tie=False, vocab=304).to(dtype)  # 304 rows: a multiple of tinygemm's 8
    return model, quantize_(model, plan)


def test_plan_kernels_mixed_plan_reports_every_layer():
    plan = Plan(rules=(("re:.*mlp\\.down_proj", LayerSpec.of("int8")),
                       ("re:.*self_attn\\.o_proj", LayerSpec.of("int3-g32")),
                       ("lm_head", LayerSpec.of("int4-g32"))),
                default=LayerSpec.of("int4-g32"))
    model, q = _quantized(plan)
    rep = plan_kernels(model, q.layers, backend="torchao")
    assert rep.served["model.layers.0.self_attn.q_proj"] == "torchao.int4_tinygemm"
    assert rep.served["model.layers.1.mlp.down_proj"] == "torchao.int8_weight_only"
    assert rep.served["lm_head"] == "torchao.int4_tinygemm"
    assert set(rep.fallback) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert "int3-g32" in rep.fallback["model.layers.0.self_attn.o_proj"]
    assert rep.counts() == {"torchao.int4_tinygemm": 11, "torchao.int8_weight_only": 2}
    with pytest.raises(KernelError, match=r"2 layer\(s\): model\.layers\.0\.self_attn\.o_proj"):
        rep.require()
    d = rep.to_dict()
    assert d["kernels"] == rep.counts() and d["backend"] == "torchao"


def test_float32_model_and_gemlite_missing_are_reasons():
    model, q = _quantized(Plan.uniform("int4-g32"), dtype=torch.float32)
    rep = plan_kernels(model, q.layers, backend="torchao")
    assert not rep.served
    assert all("bfloat16" in why for why in rep.fallback.values())
    kernel, why = choose_kernel(parse_format("int2-g32"), (64, 64), torch.bfloat16, "auto")
    if kernel is None:  # gemlite is not installed here
        assert "gemlite: not installed" in why and "tinygemm takes 4-bit" in why


def test_tied_head_and_outliers_stay_fake_quant():
    model = tiny_llama(tie=True).to(torch.bfloat16)
    plan = Plan(rules=(("lm_head", LayerSpec.of("int4-g32")),), default=LayerSpec.of("int4-g32", "rtn", outliers=0.01))
    q = quantize_(model, plan)
    rep = plan_kernels(model, q.layers, backend="torchao")
    assert not rep.served
    assert any("outliers" in why for why in rep.fallback.values())
    tied = [n for n in rep.fallback if "embed" in n or n == "lm_head"]
    assert tied and "tied" in rep.fallback[tied[0]]


def test_serves_answers_for_targets():
    assert serves(parse_format("int4-g128"), (4096, 4096), "torchao")
    assert not serves(parse_format("int2-g64"), (4096, 4096), "torchao")
    assert serves(parse_format("int2-g64"), (4096, 4096), "gemlite")  # installed or not
    assert not serves(parse_format("int8"), (576, 576), "gemlite")  # rows gemlite's blocks do not tile
    assert serves(parse_format("int8"), (576, 576), "auto")  # torchao's int8 takes it
    assert not serves(parse_format("nf4-g64"), (4096, 4096), "auto")
    assert not serves(parse_format("int4-g128"), (4096, 4096), "torchao", torch.float16)  # tinygemm is bf16 only
    with pytest.raises(KernelError, match="unknown kernel backend"):
        serves(parse_format("int4"), (8, 8), "marlin")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_apply_kernels_without_cuda_is_a_clear_error():
    model, q = _quantized(Plan.uniform("int4-g32"))
    with pytest.raises(KernelError, match="low-bit kernels run on CUDA; the model is on cpu"):
        apply_kernels(model, q.layers)
