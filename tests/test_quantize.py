"""quantize_: in-place fake quantization that keeps the codes."""

from __future__ import annotations

import pytest
import torch

from mixq.errors import MixqError, PlanError
from mixq.formats import parse_format
from mixq.plan import LayerSpec, Plan
from mixq.quantize import quantize_
from mixq.solvers import get_solver


def test_quantize_in_place_and_codes_decode_to_weights(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = quantize_(model, Plan.uniform("int4-g32"))
    fmt = parse_format("int4-g32")
    assert len(result.layers) == 14
    for name, layer in result.layers.items():
        w = model.get_submodule(name).weight
        assert torch.equal(fmt.dequantize(layer.qtensor), w)
        assert torch.equal(w, fmt.fake_quantize(before[name + ".weight"]))
        assert not torch.equal(w, before[name + ".weight"])
        assert int(layer.qtensor.codes.min()) >= -8 and int(layer.qtensor.codes.max()) <= 7
    assert torch.equal(model.model.norm.weight, before["model.norm.weight"])  # untouched
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_tied_weight_quantized_once(model):
    before = model.model.embed_tokens.weight.detach().clone()
    result = quantize_(model, Plan(rules=(("lm_head", LayerSpec.of("int8")),)))
    assert list(result.layers) == ["lm_head"]
    expected = parse_format("int8").fake_quantize(before)
    assert torch.equal(model.model.embed_tokens.weight, expected)  # quantized once, not twice


def test_nan_weights_refused_and_model_kept(model):
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(MixqError, match="model.layers.1.mlp.up_proj.*NaN"):
        quantize_(model, Plan.uniform("int8"))


def test_rtn_loss_is_layer_objective():
    torch.manual_seed(0)
    w, x = torch.randn(8, 32), torch.randn(100, 32)
    gram = x.T @ x / len(x)
    solver = get_solver("rtn")
    r = solver(w, parse_format("int3-g16"), gram, solver.options({}))
    assert r.loss == pytest.approx(float(((x @ w.T - x @ r.weight.T) ** 2).sum() / len(x)), rel=1e-4)


def test_calibrated_solver_needs_data(model, monkeypatch):
    from mixq.solvers import registry

    monkeypatch.setitem(registry._SOLVERS, "needs-data", registry.Solver("needs-data", lambda *a: None, type("O", (), {}), True))
    with pytest.raises(PlanError, match="needs calibration"):
        quantize_(model, Plan(default=LayerSpec(parse_format("int8"), "needs-data")))


# -- GPT-2's Conv1D and stacked experts ------------------------------------------------------
def _conv1d_weights(model):
    from transformers.pytorch_utils import Conv1D

    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-tensor", "fp4-e2m1", "nf4-g32", "mxfp4", "blog4-g16"])
def test_conv1d_quantized_along_its_input(fmt):
    """A Conv1D stores its weight [in, out]: its matrix [out, in] = weight.T is what is quantized."""
    from test_architectures import build

    model = build("gpt2")
    before = _conv1d_weights(model)
    result = quantize_(model, Plan.uniform(fmt))
    f = parse_format(fmt)
    assert list(result.layers) == list(before) and len(before) == 2 * 4
    for name, w in before.items():
        stored = model.get_submodule(name).weight
        assert torch.equal(stored, f.fake_quantize(w.T.contiguous()).T), name
        assert torch.equal(f.dequantize(result.layers[name].qtensor), stored.T), name


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
@pytest.mark.parametrize("fmt", ["int4-g32", "int3-tensor"])
def test_experts_quantized_one_matrix_per_expert(family, fmt):
    """Each expert's slice of a stacked parameter is its own matrix (its own groups, its own
    per-tensor scale), kept as ``<parameter>.<e>``; the router is left alone unless named."""
    from test_architectures import build

    model = build(family)
    mlp = model.model.layers[1].mlp
    down, router = mlp.experts.down_proj.detach().clone(), mlp.gate.weight.detach().clone()
    result = quantize_(model, Plan.uniform(fmt))
    f = parse_format(fmt)
    names = [f"model.layers.1.mlp.experts.down_proj.{e}" for e in range(len(down))]
    assert len(down) == 4 and set(names) <= set(result.layers)
    assert len(result.layers) == 2 * (4 + 2 * 4)  # per block: q/k/v/o, then gate_up and down of 4 experts
    for e, name in enumerate(names):
        assert torch.equal(mlp.experts.down_proj[e], f.fake_quantize(down[e]))
        assert torch.equal(f.dequantize(result.layers[name].qtensor), mlp.experts.down_proj[e])
    assert torch.equal(mlp.gate.weight, router)


def test_router_quantized_when_named():
    from test_architectures import build

    model = build("mixtral")
    plan = Plan(rules=(("re:.*mlp\\.gate", LayerSpec.of("int8")),))
    result = quantize_(model, plan)
    assert list(result.layers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert torch.equal(parse_format("int8").dequantize(result.layers["model.layers.0.mlp.gate"].qtensor),
                       model.model.layers[0].mlp.gate.weight)
