"""mixq's own checkpoint: bit packing, exact round trips of every format, sizes, atomic writes,
and damaged checkpoints refused by tensor name."""

from __future__ import annotations

import argparse
import errno
import json
import math

import pytest
import torch

import mixq
from mixq.errors import ExportError, ModelError
from mixq.export import checkpoint, export_checkpoint, load_export
from mixq.export.pack import pack_bits, packed_bytes, unpack_bits
from mixq.formats import families, parse_format
from mixq.models import load_model
from mixq.plan import LayerSpec, Plan
from mixq.quantize import QuantizedLayer, quantize_

from conftest import tiny_llama

#: one format per registered family (and every integer scheme); a new family must add one
FAMILY_EXAMPLES = {
    "int": ["int4-g32", "int3-sym-g16", "int4-fmin-g32", "int8", "int2-tensor", "int5-g48"],
    "bfp": ["bfp4-g16"], "mxint": ["mxint8"], "fp": ["fp8-e4m3", "fp6-e3m2-g32", "fp4-e2m1-raw", "fp8-e5m2-dn"],
    "mxfp": ["mxfp4", "mxfp6-e2m3"], "bmf": ["bmf6-e3m2-g16"], "log": ["log4-g16", "log3"], "blog": ["blog4-g16"],
    "nf": ["nf4-g32", "nf3", "nf2-g64"], "fxp": ["fxp8-f5", "fxp4-f2", "fxp12-f10"],
    "q": ["q2-k", "q3-k", "q4-k", "q5-k", "q6-k"],
}
EVERY_FORMAT = [f for names in FAMILY_EXAMPLES.values() for f in names]

#: every family at least once on the 15 quantizable tensors of the tiny Llama (tied embedding included)
MIXED = Plan.from_dict({"default": "int4-g32", "rules": [
    {"match": "model.layers.0.self_attn.q_proj", "format": "nf4-g32"},
    {"match": "model.layers.0.self_attn.k_proj", "format": "fp8-e4m3"},
    {"match": "model.layers.0.self_attn.v_proj", "format": "mxfp4"},
    {"match": "model.layers.0.self_attn.o_proj", "format": "log4-g16"},
    {"match": "model.layers.0.mlp.gate_proj", "format": "bfp4-g16", "options": {"outliers": 0.02}},
    {"match": "model.layers.0.mlp.up_proj", "format": "int3-fmin-g32", "options": {"outliers": 0.02, "structured": True}},
    {"match": "model.layers.0.mlp.down_proj", "format": "int5-sym-g40"},
    {"match": "model.layers.1.self_attn.q_proj", "format": "int8-tensor"},
    {"match": "model.layers.1.self_attn.k_proj", "format": "bmf6-e3m2-g16"},
    {"match": "model.layers.1.self_attn.v_proj", "format": "blog4-g16"},
    {"match": "model.layers.1.self_attn.o_proj", "format": "mxint8"},
    {"match": "model.layers.1.mlp.gate_proj", "format": "int2-g64"},
    {"match": "model.embed_tokens", "format": "int6-g32"},
]})


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _quantized(plan: Plan = MIXED):
    model = tiny_llama()
    return model, quantize_(model, plan)


# -- packing ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 8, 9, 63, 1000):
        values = torch.randint(0, 2**bits, (count,), generator=g)
        if count >= 2:
            values[:2] = torch.tensor([0, 2**bits - 1])  # both ends of the range
        data = pack_bits(values, bits)
        assert data.dtype == torch.uint8 and data.numel() == math.ceil(count * bits / 8) == packed_bytes(count, bits)
        assert torch.equal(unpack_bits(data, bits, count).long(), values)


def test_pack_layout_is_a_little_endian_bit_stream():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    # 3-bit codes straddle bytes: 5 | 6<<3 | 7<<6 = 0b11_110_101, then the last bit of 7
    assert pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]


def test_pack_refuses_codes_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([-1]), 3)


def test_every_registered_family_has_an_example():
    assert set(FAMILY_EXAMPLES) == set(families())


@pytest.mark.parametrize("name", EVERY_FORMAT)
def test_every_format_round_trips_through_its_stored_tensors(name):
    fmt = parse_format(name)
    cols = 256 if name in FAMILY_EXAMPLES["q"] else 96  # k-quants cut rows into super-blocks of 256
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(len(name))) * 0.05
    q = fmt.quantize(w)
    entry, tensors = checkpoint.encode_layer("x", QuantizedLayer(LayerSpec.of(name), q), w)
    assert entry["codes"]["bits"] == fmt.code_bits
    assert tensors["x.codes"].numel() == math.ceil(w.numel() * fmt.code_bits / 8)
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored_bits - fmt.storage_bits(tuple(w.shape)) < 8 * len(tensors)  # exactly the counted bits, bytes rounded
    got = checkpoint.layer_weight(entry, tensors.__getitem__, torch.float32)
    assert torch.equal(got, fmt.dequantize(q))


# -- whole checkpoints --------------------------------------------------------------------
def test_checkpoint_rebuilds_the_fake_quantized_model_exactly(tmp_path):
    model, result = _quantized()
    report = export_checkpoint(model, result, MIXED, tmp_path / "ck")
    assert report.layers == 15
    manifest = json.loads((tmp_path / "ck" / checkpoint.MANIFEST).read_text())
    assert manifest["plan"] == MIXED.to_dict() and manifest["dtype"] == "float32" and manifest["mixq"]
    layer = manifest["layers"]["model.layers.0.mlp.gate_proj"]
    assert layer["format"] == "bfp4-g16" and layer["shape"] == [96, 64] and layer["outliers"]["kind"] == "sparse"
    assert manifest["layers"]["model.layers.0.mlp.up_proj"]["outliers"]["kind"] == "columns"
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # the tied pair stored once
    assert all(len(r["sha256"]) == 64 for r in manifest["tensors"].values())
    loaded = mixq.load(str(tmp_path / "ck"))
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_checkpoint_in_16_bits_is_the_planned_size(tmp_path, tiny_dir):
    model = load_model(tiny_dir, dtype="float16").model  # as mixq loads models (rotary tables stay float32)
    result = quantize_(model, MIXED)
    report = export_checkpoint(model, result, MIXED, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / checkpoint.MANIFEST).read_text())
    payload = sum(math.prod(r["shape"]) * getattr(torch, r["dtype"]).itemsize for r in manifest["tensors"].values())
    plan_bytes = MIXED.size_bytes(model)
    assert report.plan_bytes == plan_bytes and not report.notes  # every 16-bit tensor stayed 16-bit
    # the codes and parameters are the counted bits; fewer outliers may be non-zero than were kept
    assert 0.99 * plan_bytes <= payload <= plan_bytes + len(manifest["tensors"])
    assert report.tensor_bytes - payload < 256 * len(manifest["tensors"])  # the safetensors headers
    loaded = load_export(tmp_path / "ck")
    assert next(loaded.model.parameters()).dtype == torch.float16
    assert torch.equal(_logits(loaded.model), _logits(model))


def test_float32_tensors_that_16_bits_would_change_are_kept_and_named(tmp_path):
    model, result = _quantized(Plan.uniform("int4-g32"))
    with torch.no_grad():
        model.model.norm.weight.add_(1e-4)  # no longer a float16 value
    report = export_checkpoint(model, result, Plan.uniform("int4-g32"), tmp_path / "ck")
    # the random float32 embedding too; the other norms (ones) fit in 16 bits
    assert report.notes == ("2 tensor(s) kept in 32 bits, which 16 bits would change (export a 16-bit model): "
                            "model.embed_tokens.weight, model.norm.weight",)
    assert torch.equal(mixq.load(str(tmp_path / "ck")).model.model.norm.weight, model.model.norm.weight)


def test_export_refuses_a_model_that_does_not_hold_the_codes(tmp_path):
    model, result = _quantized(Plan.uniform("int4-g32"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(ExportError, match=r"'model\.layers\.1\.mlp\.up_proj'.*do not reproduce"):
        export_checkpoint(model, result, Plan.uniform("int4-g32"), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# -- damaged checkpoints ------------------------------------------------------------------
@pytest.fixture
def written(tmp_path):
    model, result = _quantized(Plan.uniform("int4-g32"))
    export_checkpoint(model, result, Plan.uniform("int4-g32"), tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / checkpoint.MANIFEST).read_text())
    return tmp_path / "ck", manifest


def _data_start(file) -> int:
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_truncated_checkpoint_names_the_first_lost_tensor(written):
    folder, manifest = written
    file = folder / checkpoint.QUANTIZED_FILE
    raw = file.read_bytes()
    header = json.loads(raw[8:_data_start(file)])
    cut = _data_start(file) + (len(raw) - _data_start(file)) // 2
    lost = min((k for k, v in header.items() if k != "__metadata__" and _data_start(file) + v["data_offsets"][1] > cut),
               key=lambda k: header[k]["data_offsets"][1])
    file.write_bytes(raw[:cut])
    with pytest.raises(ModelError, match=rf"tensor '{lost}' is truncated in quantized\.safetensors"):
        mixq.load(str(folder))


def test_tampered_tensor_is_refused_by_name(written):
    folder, manifest = written
    file = folder / checkpoint.DENSE_FILE
    raw = bytearray(file.read_bytes())
    header = json.loads(raw[8:_data_start(file)])
    begin = _data_start(file) + header["model.norm.weight"]["data_offsets"][0]
    raw[begin] ^= 0x40
    file.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match=r"tensor 'model\.norm\.weight' in dense\.safetensors does not match its sha256"):
        load_model(folder)


def test_missing_file_and_missing_tensor_are_named(written, tmp_path):
    folder, manifest = written
    from safetensors.torch import load_file, save_file

    dense = load_file(str(folder / checkpoint.DENSE_FILE))
    del dense["model.layers.1.post_attention_layernorm.weight"]
    save_file(dense, str(folder / checkpoint.DENSE_FILE))
    with pytest.raises(ModelError, match=r"tensor 'model\.layers\.1\.post_attention_layernorm\.weight' is missing"):
        mixq.load(str(folder))
    (folder / checkpoint.DENSE_FILE).unlink()
    with pytest.raises(ModelError, match=r"dense\.safetensors is missing \(tensor '"):
        mixq.load(str(folder))
    (folder / checkpoint.MANIFEST).write_text("{")
    with pytest.raises(ModelError, match="not a readable mixq checkpoint manifest"):
        mixq.load(str(folder))


# -- atomic writes ------------------------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model, result = _quantized(Plan.uniform("int8"))
    out = tmp_path / "ck"
    out.mkdir()
    export_checkpoint(model, result, Plan.uniform("int8"), out)  # an empty folder is taken
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_checkpoint(model, result, Plan.uniform("int8"), out)
    (out / "stale.txt").write_text("old")
    export_checkpoint(model, result, Plan.uniform("int8"), out, overwrite=True)
    assert not (out / "stale.txt").exists() and checkpoint.is_checkpoint(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_checkpoint(model, result, Plan.uniform("int8"), tmp_path / "file", overwrite=True)


def test_failure_mid_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, result = _quantized(Plan.uniform("int4-g32"))
    out = tmp_path / "out" / "ck"
    real = checkpoint.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(ExportError, match="No space left on device.*nothing was written"):
        export_checkpoint(model, result, Plan.uniform("int4-g32"), out)
    assert len(calls) == 2 and not out.exists() and list(out.parent.iterdir()) == []
    # an earlier checkpoint at the target survives a failed overwrite untouched
    monkeypatch.setattr(checkpoint, "save_file", real)
    export_checkpoint(model, result, Plan.uniform("int4-g32"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(ExportError):
        export_checkpoint(model, result, Plan.uniform("int4-g32"), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and [p.name for p in out.parent.iterdir()] == ["ck"]


# -- the command --------------------------------------------------------------------------
def _export_command(*argv: str) -> int:
    from mixq.commands import export

    parser = argparse.ArgumentParser()
    export.add_parser(parser.add_subparsers())
    return export.run(parser.parse_args(["export", *argv]))


def test_export_command_writes_what_eval_reads_back(capsys, tiny_dir, text_file, tmp_path):
    from mixq.cli import main

    plan = tmp_path / "plan.yaml"
    plan.write_text("default: int4-g32\nrules:\n  - {match: 're:.*down_proj', format: nf4-g32}\n"
                    "  - {match: 're:.*o_proj', format: fp8-e4m3, options: {outliers: 0.01}}\n")
    out = tmp_path / "ck"
    assert _export_command("--model", str(tiny_dir), "--plan", str(plan), "--format", "mixq", "--out", str(out),
                           "--device", "cpu", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "mixq" and record["layers"] == 14 and record["plan_bytes"] == record["size_bytes"]
    assert record["provenance"]["model"]["sha256"]
    evaluate = ["--dataset", str(text_file), "--seqlen", "32", "--limit", "3", "--device", "cpu", "--json"]
    assert main(["eval", "--model", str(tiny_dir), "--plan", str(plan), *evaluate]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(out), *evaluate]) == 0
    reloaded = json.loads(capsys.readouterr().out)
    assert reloaded["ppl"] == direct["ppl"]
    with pytest.raises(ExportError, match="not empty"):
        _export_command("--model", str(tiny_dir), "--plan", "int8", "--format", "mixq", "--out", str(out))


def test_export_command_refuses_gguf_without_its_module_and_fallback_elsewhere(monkeypatch, tiny_dir, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mixq.export.gguf" else real(name, *a))
    with pytest.raises(ExportError, match="GGUF export is not available in this build"):
        _export_command("--model", str(tiny_dir), "--plan", "int8", "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    with pytest.raises(ExportError, match="--fallback-16bit applies to --format compressed-tensors and gguf"):
        _export_command("--model", str(tiny_dir), "--plan", "int8", "--format", "mixq", "--out", str(tmp_path / "x"),
                        "--fallback-16bit")


def test_export_command_writes_gguf(tiny_dir, tmp_path, capsys):
    """int8-sym-g32 is GGUF's Q8_0: the file reads back through gguf and holds the solver's codes exactly."""
    import gguf

    out = tmp_path / "m.gguf"
    assert _export_command("--model", str(tiny_dir), "--plan", "int8-sym-g32", "--format", "gguf", "--out", str(out),
                           "--device", "cpu", "--json") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert record["file_bytes"] == out.stat().st_size and "Q8_0" in types.values()
    assert sum(t == "Q8_0" for t in types.values()) == 14  # the 7 Linear layers of each of the 2 blocks



@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_checkpoint_of_conv1d_and_expert_layers(tmp_path, family):
    """GPT-2 stores its Conv1D weights [in, out]; Mixtral stacks its experts in 3-D parameters
    (one quantized matrix per expert): both come back exactly."""
    from test_architectures import build

    from mixq.quantize import quantize_

    model = build(family)
    plan = Plan.uniform("int4-g32")
    result = quantize_(model, plan)
    report = export_checkpoint(model, result, plan, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / checkpoint.MANIFEST).read_text())
    entries = manifest["layers"].values()
    if family == "gpt2":
        assert any(e["transposed"] for e in entries) and report.layers == 8
    else:
        assert {e["index"] for e in entries} >= {0, 1, 2, 3}
    loaded = mixq.load(str(tmp_path / "ck"))
    assert torch.equal(_logits(loaded.model), _logits(model))
