"""compressed-tensors export: schemes, refusals per layer, packing at every width, and the
checkpoint read back by transformers and by compressed-tensors' decompressor."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file

import mixq
from mixq.errors import ExportError
from mixq.export import compressed_tensors as ct
from mixq.export import exported_format
from mixq.formats import IntFormat, parse_format
from mixq.models import load_model
from mixq.plan import Plan
from mixq.quantize import quantize_

from conftest import tiny_llama

# the tiny Llama's rows are 64 wide (96 for down_proj): groups of 32 divide both
MIXED = Plan.from_dict({"default": "int4-g32", "rules": [  # int4-g32 asymmetric on attention's q/k/v
    {"match": "re:.*o_proj", "format": "int8"},  # per channel, integer zero point
    {"match": "re:.*(gate|up)_proj", "format": "int3-sym-g32"},
    {"match": "re:.*down_proj", "format": "int8"},
]})
SYMMETRIC = Plan.from_dict({"default": "int4-sym-g32", "rules": [
    {"match": "re:.*o_proj", "format": "int8-sym-tensor"},
    {"match": "re:.*(gate|up)_proj", "format": "int3-sym-g32"},
    {"match": "re:.*down_proj", "format": "int6-sym-g32"},
]})


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _export(plan: Plan, out, *, model=None, **kw):
    model = tiny_llama() if model is None else model
    result = quantize_(model, plan)
    return model, ct.export_compressed_tensors(model, result, plan, out, **kw)


def _from_pretrained(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kw).eval()


# -- schemes and refusals -----------------------------------------------------------------
def test_schemes_of_integer_formats():
    assert ct.scheme_of(parse_format("int4-g32"), 64) == (ct.CTScheme(4, False, "group", 32), None)
    assert ct.scheme_of(parse_format("int8"), 64) == (ct.CTScheme(8, False, "channel"), None)
    assert ct.scheme_of(parse_format("int3-sym-g32"), 96) == (ct.CTScheme(3, True, "group", 32), None)
    assert ct.scheme_of(parse_format("int8-sym-tensor"), 64) == (ct.CTScheme(8, True, "tensor"), None)
    assert ct.scheme_of(parse_format("int4-g64"), 64)[0] == ct.CTScheme(4, False, "channel")  # one group per row


@pytest.mark.parametrize(("name", "why"), [
    ("nf4-g32", "integer grids only"), ("fp8-e4m3", "integer grids only"), ("mxfp4", "integer grids only"),
    ("log4-g16", "integer grids only"), ("int4-fmin-g32", "not an integer zero point"),
    ("mxint8", "power-of-two exponent"), ("bfp4-g16", "power-of-two exponent"),
    ("int4-g48", "end in a group of 16"),
])
def test_formats_the_target_cannot_hold(name, why):
    scheme, reason = ct.scheme_of(parse_format(name), 64)
    assert scheme is None and why in reason


def test_plan_refusals_name_every_offending_layer(tmp_path):
    plan = Plan.from_dict({"default": "int4-g32", "rules": [
        {"match": "model.layers.0.self_attn.q_proj", "format": "nf4-g32"},
        {"match": "model.layers.1.self_attn.k_proj", "format": "int8"},  # q/k/v of block 1 no longer agree
        {"match": "model.layers.0.mlp.down_proj", "format": "int4-g32", "options": {"outliers": 0.01}},
        {"match": "model.layers.1.mlp.down_proj", "format": "int4-g64"},  # rows of 96: a last group of 32
        {"match": "lm_head", "format": "int8"},
    ]})
    model = tiny_llama(tie=False)
    checks = {c.name: c for c in ct.check_layers(model, plan.resolve(model))}
    refused = {n: c.reason for n, c in checks.items() if c.scheme is None}
    assert set(refused) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                            "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                            "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
                            "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"}
    assert "integer grids only" in refused["model.layers.0.self_attn.q_proj"]
    assert "vLLM fuses q_proj, k_proj, v_proj" in refused["model.layers.0.self_attn.k_proj"]
    assert "k_proj: int8 asym channel" in refused["model.layers.1.self_attn.q_proj"]
    assert "outliers" in refused["model.layers.0.mlp.down_proj"]
    assert "group of 32" in refused["model.layers.1.mlp.down_proj"]
    assert "inside the transformer blocks" in refused["lm_head"]
    with pytest.raises(ExportError, match=r"cannot hold 9 planned layer\(s\).*model\.layers\.1\.mlp\.down_proj"):
        _export(plan, tmp_path / "ct", model=model)
    assert not (tmp_path / "ct").exists()


def test_fallback_writes_refused_layers_in_16_bits_and_keeps_fused_groups_whole(tmp_path):
    plan = Plan.from_dict({"default": "int4-g32", "rules": [
        {"match": "model.layers.0.self_attn.q_proj", "format": "nf4-g32"},
        {"match": "model.layers.1.mlp.gate_proj", "format": "fp8-e4m3"},
    ]})
    model, report = _export(plan, tmp_path / "ct", fallback_16bit=True)
    assert set(report.fallback) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                    "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj",
                                    "model.layers.1.mlp.up_proj"}
    assert report.layers == 14 - 5
    tensors = load_file(str(tmp_path / "ct" / ct.WEIGHTS_FILE))
    assert "model.layers.0.self_attn.k_proj.weight" in tensors and "model.layers.0.self_attn.k_proj.weight_packed" not in tensors
    # a 16-bit layer keeps its fake-quantized values, so the whole model is still mixq's
    assert torch.equal(_logits(mixq.load(str(tmp_path / "ct")).model), _logits(model))


# -- the checkpoint -----------------------------------------------------------------------
def test_mixed_plan_config_and_tensors(tmp_path):
    _, report = _export(MIXED, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed"
    groups = {json.dumps({k: g["weights"][k] for k in ("num_bits", "strategy", "group_size", "symmetric")}): g["targets"]
              for g in config["config_groups"].values()}
    assert groups == {
        json.dumps({"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}):
            [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"],
        json.dumps({"num_bits": 8, "strategy": "channel", "group_size": None, "symmetric": False}):
            [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")],
        json.dumps({"num_bits": 3, "strategy": "group", "group_size": 32, "symmetric": True}):
            [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")],
    }
    tensors = load_file(str(tmp_path / "ct" / ct.WEIGHTS_FILE))
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight_packed"].dtype == torch.int32 and tensors[f"{q}.weight_packed"].shape == (64, 8)
    assert tensors[f"{q}.weight_scale"].shape == (64, 2) and tensors[f"{q}.weight_shape"].tolist() == [64, 64]
    assert tensors[f"{q}.weight_zero_point"].shape == (8, 2)  # 4-bit zero points packed along the rows
    gate = "model.layers.0.mlp.gate_proj"
    assert tensors[f"{gate}.weight_packed"].shape == (96, 6) and f"{gate}.weight_zero_point" not in tensors
    assert f"{q}.weight" not in tensors and "lm_head.weight" not in tensors  # tied: one tensor
    assert "transformers" in report.extra and exported_format(tmp_path / "ct") == "compressed-tensors"


def test_mixed_plan_decompresses_to_mixqs_model_exactly(tmp_path):
    model, report = _export(MIXED, tmp_path / "ct")
    # transformers 5.x cannot take several schemes with zero points (see ct.transformers_load); the export says so
    assert report.extra["transformers"].startswith("not by transformers")
    loaded = mixq.load(str(tmp_path / "ct"))  # compressed-tensors' own decompressor, layer by layer
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_symmetric_mixed_plan_loads_in_transformers(tmp_path):
    model, report = _export(SYMMETRIC, tmp_path / "ct")
    assert report.extra["transformers"] == "AutoModelForCausalLM.from_pretrained(DIR)"
    assert torch.equal(_logits(_from_pretrained(tmp_path / "ct")), _logits(model))


def test_one_asymmetric_scheme_loads_in_transformers_dequantized(tmp_path):
    from transformers import CompressedTensorsConfig

    model, report = _export(Plan.uniform("int4-g32"), tmp_path / "ct")
    assert "dequantize=True" in report.extra["transformers"]
    loaded = _from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.equal(_logits(loaded), _logits(model))


def test_float16_export_is_exact_in_transformers(tmp_path, tiny_dir):
    model = load_model(tiny_dir, dtype="float16").model
    plan = Plan.uniform("int4-sym-g32")
    _, report = _export(plan, tmp_path / "ct", model=model)
    loaded = _from_pretrained(tmp_path / "ct")
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float16  # decompressed by that forward
    # 16-bit tensors, 4-bit codes, fp16 scales: the file is the plan's size but for packing to 32 codes and headers
    assert report.plan_bytes <= report.tensor_bytes < 1.01 * report.plan_bytes + 20_000


def test_bfloat16_export_keeps_float32_scales(tmp_path, tiny_dir):
    model = load_model(tiny_dir, dtype="bfloat16").model
    _, report = _export(Plan.uniform("int4-sym-g32"), tmp_path / "ct", model=model)
    tensors = load_file(str(tmp_path / "ct" / ct.WEIGHTS_FILE))
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert any("round mixq's float16 scales" in n for n in report.notes)  # as transformers and vLLM load them
    assert torch.equal(_logits(mixq.load(str(tmp_path / "ct")).model), _logits(model))


# -- compressed-tensors' packing ----------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_round_trip_every_width(bits, symmetric):
    """mixq's codes, scales and zero points through compressed-tensors' compressor and back, at every width."""
    fmt = IntFormat(bits, "sym" if symmetric else "asym", 32)
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(bits)) * 0.1
    q = fmt.quantize(w)
    scheme = ct.CTScheme(bits, symmetric, "group", 32)
    state = {"weight": fmt.dequantize(q), "weight_scale": q.params["scale"]}
    if not symmetric:
        state["weight_zero_point"] = q.params["zero"].to(torch.int8)
    ct_scheme = QuantizationScheme(targets=["x"], weights=scheme.args())
    out = PackedQuantizationCompressor.compress(state, ct_scheme)
    assert out["weight_packed"].shape == (40, 96 * bits // 32)  # dense: 32 codes in exactly `bits` words
    assert torch.equal(unpack_from_int32(out["weight_packed"], bits, out["weight_shape"]), q.codes)
    assert torch.equal(PackedQuantizationCompressor.decompress(out, ct_scheme)["weight"], fmt.dequantize(q))


def test_installed_compressed_tensors_packs_3_bits_densely():
    """The layout vLLM reads since compressed-tensors 0.18 (pyproject pins it): 32 3-bit codes in 3 words,
    code i at bits 3i..3i+2 of one little-endian stream (earlier versions put 10 per word, in 4 words)."""
    codes = torch.arange(32, dtype=torch.int64) % 8
    packed = pack_to_int32((codes - 4).to(torch.int8).reshape(1, 32), 3)
    assert packed.shape == (1, 3)
    stream = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(packed[0]))
    assert [(stream >> (3 * i)) & 7 for i in range(32)] == codes.tolist()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ct, "save_file", full_disk)
    with pytest.raises(ExportError, match="nothing was written"):
        _export(Plan.uniform("int8"), tmp_path / "out" / "ct")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_command_refuses_before_solving_and_falls_back_on_request(capsys, tiny_dir, tmp_path, monkeypatch):
    import argparse

    from mixq.commands import export

    def command(*argv: str) -> int:
        parser = argparse.ArgumentParser()
        export.add_parser(parser.add_subparsers())
        return export.run(parser.parse_args(["export", "--model", str(tiny_dir), "--device", "cpu", "--format",
                                             "compressed-tensors", *argv]))

    def no_solving(*a, **k):
        raise AssertionError("quantized before the plan was checked")

    with monkeypatch.context() as m:
        m.setattr("mixq.quantize.quantize_", no_solving)
        with pytest.raises(ExportError, match=r"nf4-g32: pack-quantized holds integer grids only.*\[14: "):
            command("--plan", "nf4-g32", "--out", str(tmp_path / "a"))
    capsys.readouterr()
    assert command("--plan", "int4-g64", "--option", "outliers=0.01", "--out", str(tmp_path / "b"), "--json",
                   "--fallback-16bit") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "compressed-tensors" and record["layers"] == 0 and len(record["fallback_16bit"]) == 14
    assert record["transformers"] == "AutoModelForCausalLM.from_pretrained(DIR)"
    assert "quantization_config" not in json.loads((tmp_path / "b" / "config.json").read_text())
