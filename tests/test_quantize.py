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
