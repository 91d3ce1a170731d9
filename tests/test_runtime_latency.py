"""The latency model's arithmetic: keys, sums, the rest of the model, plans mapped to layers (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from mixq.errors import MixqError
from mixq.plan import LayerSpec, Plan
from mixq.runtime.latency import (
    BASE,
    LatencyModel,
    LatencyTable,
    layer_key,
    linear_shapes,
    record_rest,
    throughput_loss,
)

TINY = "torchao.int4_tinygemm"
INT8 = "torchao.int8_weight_only"
# microseconds per call by (out, in): base, int4-g32 (tinygemm), int8 (int8 weight-only)
TIMES = {(64, 64): (10, 4, 6), (32, 64): (8, 3, 5), (96, 64): (12, 5, 7), (64, 96): (12, 5, 7), (304, 64): (20, 9, 13)}


def _table(batch: int = 1) -> LatencyTable:
    t = LatencyTable("NVIDIA H200|torch 2.11.0")
    for shape, (b, i4, i8) in TIMES.items():
        t.layers[layer_key(shape, BASE, BASE, batch)] = b * 1e-6
        t.layers[layer_key(shape, "int4-g32", TINY, batch)] = i4 * 1e-6
        t.layers[layer_key(shape, "int8", INT8, batch)] = i8 * 1e-6
    return t


@pytest.fixture
def lm():
    model = tiny_llama(tie=False, vocab=304).to(torch.bfloat16)
    table = _table()
    shapes = linear_shapes(model)
    # the base step measured at 250 us: the rest is what its Linear layers do not take
    rest = record_rest(table, shapes, model_key="tiny", batch=1, base_step_seconds=250e-6)
    base_linear = 2 * (10 + 8 + 8 + 10 + 12 + 12 + 12) + 20  # per block q k v o gate up down, then lm_head
    assert rest == pytest.approx(250e-6 - base_linear * 1e-6)
    return LatencyModel.for_model(table, model, model_key="tiny", batch=1), rest


def test_keys_and_shapes():
    assert layer_key((4096, 14336), "int4-g128", TINY, 16) == "4096x14336|int4-g128|torchao.int4_tinygemm|16"
    shapes = linear_shapes(tiny_llama(tie=False, vocab=304))
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 96) and shapes["lm_head"] == (304, 64)
    assert len(shapes) == 15


def test_base_plan_predicts_the_measured_step(lm):
    model, rest = lm
    assert model.predict(Plan()) == pytest.approx(250e-6)
    assert model.tokens_per_s(Plan()) == pytest.approx(1 / 250e-6)


def test_uniform_and_mixed_plans_sum_their_layers(lm):
    model, rest = lm
    int4 = 2 * (4 + 3 + 3 + 4 + 5 + 5 + 5) + 20  # lm_head stays 16-bit: the plan does not name it
    assert model.predict(Plan.uniform("int4-g32")) == pytest.approx(rest + int4 * 1e-6)
    mixed = Plan(rules=(("re:.*mlp\\.down_proj", LayerSpec.of("int8")),
                        ("re:.*self_attn\\.o_proj", LayerSpec.of("int3-g32")),  # no kernel: counted as 16-bit
                        ("lm_head", LayerSpec.of("int8"))),
                 default=LayerSpec.of("int4-g32"))
    expect = 2 * (4 + 3 + 3 + 10 + 5 + 5 + 7) + 13
    parts = model.breakdown(mixed)
    assert parts["model.layers.0.self_attn.o_proj"] == pytest.approx(10e-6)
    assert parts["model.layers.0.mlp.down_proj"] == pytest.approx(7e-6)
    assert model.predict(mixed) == pytest.approx(rest + expect * 1e-6)
    # the same as a layer -> format mapping
    mapping = {n: "int4-g32" for n in model.shapes if n != "lm_head"}
    assert model.predict(mapping) == pytest.approx(rest + int4 * 1e-6)


def test_kernels_come_from_the_table_not_from_this_machine(lm):
    model, rest = lm
    # a table without tinygemm: int4 layers fall back to the 16-bit Linear (gemlite does not
    # take 64-wide rows), int8 ones take the int8 kernel that was measured
    t = LatencyTable("x")
    for shape, (b, i4, i8) in TIMES.items():
        t.layers[layer_key(shape, BASE, BASE, 1)] = b * 1e-6
        t.layers[layer_key(shape, "int8", INT8, 1)] = 2e-6
    t.rest["tiny|1"] = 100e-6
    g = LatencyModel(t, model.shapes, "tiny", 1, model=model.model)
    assert g.kernel_for((64, 64), "int4-g32") == BASE
    assert g.kernel_for((64, 64), "int8") == INT8
    assert g.kernel_for((64, 64), None) == BASE
    assert g.predict(Plan.uniform("int4-g32")) == pytest.approx(100e-6 + (2 * (10 + 8 + 8 + 10 + 12 + 12 + 12) + 20) * 1e-6)
    assert g.predict(Plan.uniform("int8")) == pytest.approx(100e-6 + (14 * 2 + 20) * 1e-6)
    assert model.kernel_for((64, 64), "int8") == INT8  # gemlite first in auto order, but not measured
    t.layers.pop(layer_key((64, 64), "int8", INT8, 1))
    with pytest.raises(MixqError, match=r"no measurement '64x64\|int8\|torchao.int8_weight_only\|1'"):
        g.predict(Plan.uniform("int8"))
    with pytest.raises(MixqError, match="rest-of-model"):
        LatencyModel(t, model.shapes, "other", 1, model=model.model).predict(Plan())


def test_bad_assignments_are_errors(lm):
    model, _ = lm
    with pytest.raises(MixqError, match="not Linear layers"):
        model.predict({"model.embed_tokens": "int8"})
    with pytest.raises(MixqError, match="no model to resolve"):
        LatencyModel(model.table, model.shapes, "tiny", 1).predict(Plan())


def test_table_round_trip_keeps_devices_apart(tmp_path):
    path = tmp_path / "lat.json"
    a = _table()
    a.rest["tiny|1"] = 1e-4
    a.save(path)
    b = LatencyTable("NVIDIA A100|torch 2.11.0", {layer_key((8, 8), BASE, BASE, 1): 1e-6})
    b.save(path)
    assert LatencyTable.load(path, "NVIDIA H200|torch 2.11.0") == a
    assert LatencyTable.load(path, b.device) == b
    with pytest.raises(MixqError, match="holds 2 devices"):
        LatencyTable.load(path)
    with pytest.raises(MixqError, match="no measurements for 'gpu'"):
        LatencyTable.load(path, "gpu")
    assert a.kernels() == {TINY, INT8}


def test_throughput_loss_ranks_infeasible_last():
    fast, ok = throughput_loss(1e-3, 10.0, max_ppl=10.5, base_seconds=3e-3)
    slow, ok2 = throughput_loss(2e-3, 9.0, max_ppl=10.5, base_seconds=3e-3)
    bad, feasible = throughput_loss(0.5e-3, 10.6, max_ppl=10.5, base_seconds=3e-3)
    assert ok and ok2 and not feasible
    assert fast == pytest.approx(0.25) and slow == pytest.approx(0.4)
    assert bad == pytest.approx(1 + 10.6 / 10.5 - 1) and bad > 1 > slow > fast
    assert throughput_loss(1e-3, math.nan, max_ppl=10.5, base_seconds=3e-3) == (2.0, False)
    with pytest.raises(MixqError):
        throughput_loss(0.0, 10.0, max_ppl=10.5, base_seconds=3e-3)


def test_kernel_targets_serve_by_shape():
    """A search space's target: (mixq.search.target) asks the kernels' own checks, shape by shape."""
    from mixq.formats import parse_format
    from mixq.search.target import serves

    def kept(choices, shapes, target):
        return [c for c in choices if all(serves(target, parse_format(c), s) for s in shapes)]

    choices = ["int2-g64", "int3-g128", "int4-g128", "int8", "int4-sym-g128", "nf4-g64"]
    shapes = [(576, 576), (192, 576)]
    assert kept(choices, shapes, "torchao") == ["int4-g128", "int8", "int4-sym-g128"]
    assert kept(choices, shapes, "gemlite") == []  # 576 wide: gemlite's blocks do not tile it
    assert kept(choices, [(4096, 4096)], "gemlite") == ["int2-g64", "int4-g128", "int8", "int4-sym-g128"]
    assert kept(["int4-g128"], [(4096, 100)], "torchao") == []
