"""Plans: matching, round trips, exact sizes, tied weights, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from mixq.errors import PlanError
from mixq.formats import parse_format
from mixq.plan import LayerSpec, Plan

from conftest import tiny_llama


def _plan() -> Plan:
    return Plan(
        rules=(("re:.*\\.mlp\\.down_proj", LayerSpec.of("int8")),
               ("model.layers.0.self_attn.q_proj", LayerSpec.of("nf4-g32", "rtn")),
               ("re:.*q_proj", LayerSpec.of("int3-g32"))),
        default=LayerSpec.of("int4-g32"),
        skip=("model.layers.1.self_attn.o_proj",),
    )


def test_round_trip_dict_json_yaml(tmp_path):
    plan = _plan()
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert Plan.from_dict(yaml.safe_load(plan.to_yaml())) == plan
    for name in ("p.yaml", "p.json"):
        plan.save(tmp_path / name)
        assert Plan.load(tmp_path / name) == plan


def test_first_match_wins_default_and_skip(model):
    specs = _plan().resolve(model)
    assert specs["model.layers.0.self_attn.q_proj"].format.name == "nf4-g32"  # before the regex
    assert specs["model.layers.1.self_attn.q_proj"].format.name == "int3-g32"
    assert specs["model.layers.0.mlp.down_proj"].format.name == "int8"
    assert specs["model.layers.0.mlp.up_proj"].format.name == "int4-g32"
    assert "model.layers.1.self_attn.o_proj" not in specs
    assert "lm_head" not in specs and "model.embed_tokens" not in specs  # not quantized by default
    assert len(specs) == 2 * 7 - 1


def test_exact_size(model):
    plan = Plan.uniform("int4-g32")
    rep = plan.size_report(model)
    # per block: q (64x64), k, v (32x64 each: 2 kv heads x 16), o (64x64), gate/up (96x64), down (64x96)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)] * 2
    bits = sum(r * c * 4 + r * (c // 32) * (16 + 4) for r, c in shapes)
    assert rep.quantized_bits == bits
    assert rep.quantized_weights == sum(r * c for r, c in shapes)
    total = sum(p.numel() for p in model.parameters())  # tied lm_head counted once by parameters()
    assert rep.other_params == total - rep.quantized_weights
    assert rep.size_bytes == -(-(bits + rep.other_params * 16) // 8)
    assert plan.bits(model) == pytest.approx(4 + 20 / 32)
    assert Plan().size_bytes(model) == total * 2


def test_tied_embedding_counted_once(model):
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = Plan(rules=(("lm_head", LayerSpec.of("int8")),))
    specs = plan.resolve(model)
    assert list(specs) == ["lm_head"]
    rep = plan.size_report(model)
    assert rep.quantized_weights == model.lm_head.weight.numel()
    both = Plan(rules=(("model.embed_tokens", LayerSpec.of("int8")), ("lm_head", LayerSpec.of("int8"))))
    assert both.size_report(model) == Plan(rules=(("model.embed_tokens", LayerSpec.of("int8")),)).size_report(model)
    clash = Plan(rules=(("model.embed_tokens", LayerSpec.of("int8")), ("lm_head", LayerSpec.of("int4-g32"))))
    with pytest.raises(PlanError, match="tied"):
        clash.resolve(model)


def test_untied_lm_head_is_its_own_tensor():
    model = tiny_llama(tie=False)
    plan = Plan(rules=(("lm_head", LayerSpec.of("int8")),), default=LayerSpec.of("int8"))
    assert "lm_head" in plan.resolve(model) and "model.embed_tokens" not in plan.resolve(model)


def test_helpers(model):
    per_block = Plan.per_block([LayerSpec.of("int8"), LayerSpec.of("int3-g32")], "model.layers")
    specs = per_block.resolve(model)
    assert {s.format.name for n, s in specs.items() if n.startswith("model.layers.0.")} == {"int8"}
    assert {s.format.name for n, s in specs.items() if n.startswith("model.layers.1.")} == {"int3-g32"}
    shared = Plan.shared({"mlp.down_proj": LayerSpec.of("int8")}, default=LayerSpec.of("int4-g32"))
    specs = shared.resolve(model)
    assert [n for n, s in specs.items() if s.format.name == "int8"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    one = Plan.per_layer({"model.layers.1.mlp.up_proj": LayerSpec.of("nf4-g32")})
    assert list(one.resolve(model)) == ["model.layers.1.mlp.up_proj"]


def test_plan_errors(model):
    with pytest.raises(PlanError, match="names no existing layer"):
        Plan(rules=(("model.layers.9.mlp.up_proj", LayerSpec.of("int8")),)).resolve(model)
    with pytest.raises(PlanError, match="names no existing layer"):
        Plan(skip=("re:.*nothing.*",)).resolve(model)
    with pytest.raises(PlanError, match="exceeds the row width"):
        Plan.uniform("int4-g128").resolve(model)  # rows are 64 or 96 wide
    with pytest.raises(PlanError, match="unknown format"):
        Plan.from_dict({"default": {"format": "q4k"}})
    with pytest.raises(PlanError, match="unknown option .q7."):
        Plan.from_dict({"default": {"format": "int4-q7"}})
    with pytest.raises(PlanError, match="2 to 8 bits"):
        Plan.from_dict({"default": "int12"})
    with pytest.raises(PlanError, match="unknown solver"):
        Plan.from_dict({"default": {"format": "int4", "solver": "magic"}})
    with pytest.raises(PlanError, match="no option"):
        Plan.from_dict({"default": {"format": "int4", "solver": "rtn", "options": {"damp": 0.1}}})
    with pytest.raises(PlanError, match="unknown key"):
        Plan.from_dict({"defualt": "int4"})
    with pytest.raises(PlanError, match="needs a 'match'"):
        Plan.from_dict({"rules": [{"format": "int4"}]})
    with pytest.raises(PlanError, match="bad regex"):
        Plan.from_dict({"rules": [{"match": "re:(", "format": "int4"}]})


def test_malformed_plan_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="not found"):
        Plan.parse(str(tmp_path / "missing.yaml"))
    with pytest.raises(PlanError, match="neither a plan file nor a preset"):
        Plan.parse("int4-banana")


def test_preset_and_spec_shorthand():
    assert Plan.preset("int4-g128") == Plan(default=LayerSpec(parse_format("int4-g128")))
    assert Plan.preset("base") == Plan()
    assert Plan.from_dict({"default": "int4-g128"}) == Plan.preset("int4-g128")


def _int(bits: int, rows: int, cols: int, group: int | None = None) -> int:
    """Bits of an asymmetric integer format: codes, then a 16-bit scale and a bits-wide zero point per group."""
    groups = rows * (1 if group is None else -(-cols // group))
    return rows * cols * bits + groups * (16 + bits)


def test_expert_tensors_named_by_parameter_and_sized_per_expert():
    from test_architectures import build

    model = build("mixtral")  # 4 experts, hidden 64, intermediate 96
    plan = Plan(rules=(("re:.*experts\\.down_proj", LayerSpec.of("int8")), ("model.layers.1.mlp.gate", LayerSpec.of("int8"))),
                default=LayerSpec.of("int4-g32"))
    specs = plan.resolve(model)
    assert specs["model.layers.0.mlp.experts.down_proj"].format.name == "int8"
    assert specs["model.layers.0.mlp.experts.gate_up_proj"].format.name == "int4-g32"
    assert "model.layers.0.mlp.gate" not in specs and specs["model.layers.1.mlp.gate"].format.name == "int8"
    attention = _int(4, 64, 64, 32) * 2 + _int(4, 32, 64, 32) * 2  # q, o; k, v (2 kv heads of 16)
    experts = 4 * (_int(4, 2 * 96, 64, 32) + _int(8, 64, 96))  # per expert: gate_up [192, 64], down [64, 96]
    rep = plan.size_report(model)
    assert rep.quantized_bits == 2 * (attention + experts) + _int(8, 4, 64)  # and one router [4, 64]
    assert rep.quantized_weights == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 4 * (192 * 64 + 64 * 96)) + 4 * 64
    assert rep.layers == 2 * 6 + 1


def test_conv1d_sized_as_its_out_in_matrix():
    """GPT-2's c_attn stores [64, 192]: as a matrix it has 192 rows of 64, each with its own scale."""
    from test_architectures import build

    model = build("gpt2")
    block = _int(8, 192, 64) + _int(8, 64, 64) + _int(8, 256, 64) + _int(8, 64, 256)  # c_attn, c_proj, c_fc, mlp.c_proj
    rep = Plan.uniform("int8").size_report(model)
    assert rep.quantized_bits == 2 * block and rep.layers == 8
