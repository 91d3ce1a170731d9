"""GGUF export of tiny models: types, exact dequantisation, transformers' loader, refusals, atomic writes."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import byte_tokenizer  # noqa: E402
from mixq.errors import ExportError, PlanError  # noqa: E402
from mixq.export.gguf import export_gguf, gguf_type, llama_permute, pack  # noqa: E402
from mixq.formats import parse_format  # noqa: E402
from mixq.plan import Plan  # noqa: E402
from mixq.quantize import quantize_  # noqa: E402

#: every GGUF type the export writes, on the layers of a two-block Llama (first match wins)
MIXED = {"default": {"format": "q4-k"}, "rules": [
    {"match": "model.layers.0.self_attn.q_proj", "format": "q5-k"},
    {"match": "re:.*k_proj", "format": "int5-fmin-g32"},
    {"match": "re:.*v_proj", "format": "q6-k"},
    {"match": "re:.*o_proj", "format": "int8-sym-g32"},
    {"match": "model.layers.0.mlp.gate_proj", "format": "int5-sym-g32"},
    {"match": "re:.*gate_proj", "format": "int4-fmin-g32"},
    {"match": "re:.*up_proj", "format": "q2-k"},
    {"match": "re:.*down_proj", "format": "q3-k"},
    {"match": "model.embed_tokens", "format": "int4-sym-g32"},
    {"match": "lm_head", "format": "q6-k"}]}
EXPECTED_TYPES = {"blk.0.attn_q.weight": "Q5_K", "blk.1.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q5_1",
                  "blk.0.attn_v.weight": "Q6_K", "blk.0.attn_output.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q5_0",
                  "blk.1.ffn_gate.weight": "Q4_1", "blk.0.ffn_up.weight": "Q2_K", "blk.0.ffn_down.weight": "Q3_K",
                  "token_embd.weight": "Q4_0", "output.weight": "Q6_K", "blk.0.attn_norm.weight": "F32"}


def fp16_exact(model):
    """Round every parameter to fp16 so that unplanned tensors are stored exactly in F16."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def tiny_llama256(*, tie: bool = False):
    """tests/conftest.py's tiny Llama with rows that hold whole k-quant super-blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return fp16_exact(model)


def merging_tokenizer():
    """conftest's byte-level BPE with a few merges (the path llama.cpp's gpt2 vocabulary takes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_weights(path, config) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantised by gguf, Llama's q/k rows back in HF order."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        for tag, heads in ((".attn_q.", config.num_attention_heads), (".attn_k.", config.num_key_value_heads)):
            if tag in t.name:  # the inverse of llama_permute
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        out[t.name] = w
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama256()
    result = quantize_(model, Plan.from_dict(MIXED))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    out = export_gguf(model, result.layers, merging_tokenizer(), path)
    return model, result, out


def test_types_and_size(exported):
    model, result, out = exported
    assert out.path.is_file() and out.size_bytes == out.path.stat().st_size
    reader = gguf.GGUFReader(out.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {k: types[k] for k in EXPECTED_TYPES} == EXPECTED_TYPES == {k: out.types[k] for k in EXPECTED_TYPES}
    assert len(types) == 2 * 9 + 3  # 7 Linear + 2 norms per block; embedding, output, final norm
    # quantized tensors take exactly the plan's bits; the rest is metadata, F32 norms and alignment
    quantized = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name not in ("F32", "F16"))
    plan_bits = sum(layer.spec.format.storage_bits(tuple(layer.qtensor.codes.shape)) for layer in result.layers.values())
    assert quantized * 8 == plan_bits
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2


def test_dequantises_to_the_fake_quantized_weights_exactly(exported):
    model, _, out = exported
    modules = dict(model.named_modules())

    names = {"token_embd.weight": "model.embed_tokens", "output.weight": "lm_head",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj",
             "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj",
             "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj", "output_norm.weight": "model.norm"}
    weights = gguf_weights(out.path, model.config)
    for gguf_name, hf in names.items():
        assert np.array_equal(weights[gguf_name], modules[hf].weight.detach().numpy()), gguf_name
    # the permutation is llama.cpp's (a row reorder that moves whole blocks)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(llama_permute(q, 4), q)


def test_loads_in_transformers_with_equal_logits(exported):
    model, _, out = exported
    loaded, tokenizer = load_gguf(out.path)
    reference = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, reference[name]), name
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    text = "hello, world"
    assert tokenizer(text)["input_ids"] == merging_tokenizer()(text)["input_ids"]


def test_legacy_types_hold_ggml_q8_0_bytes():
    """On values already on a Q8_0 grid, mixq's int8-sym-g32 finds gguf's own scales and codes."""
    rs = np.random.RandomState(0)
    d = (rs.uniform(0.001, 0.1, (4, 2, 1))).astype(np.float16).astype(np.float32)
    codes = rs.randint(-127, 128, (4, 2, 32)).astype(np.float32)
    codes[:, :, 0] = 127  # the block's largest magnitude
    x = (d * codes).reshape(4, 64)
    fmt = parse_format("int8-sym-g32")
    packed, qtype = pack(fmt, fmt.quantize(torch.from_numpy(x)))
    assert qtype == gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(packed, gguf.quants.quantize(x, qtype))


@pytest.mark.parametrize(("name", "expected"), [("int8-sym-g32", "Q8_0"), ("int4-sym-g32", "Q4_0"),
                                                ("int5-fmin-g32", "Q5_1"), ("q3-k", "Q3_K"), ("int4-g32", None),
                                                ("int4-sym-g64", None), ("nf4-g32", None), ("int3-sym-g32", None)])
def test_gguf_type_is_the_same_grid_at_the_same_size(name, expected):
    fmt = parse_format(name)
    qtype = gguf_type(fmt)
    assert (qtype.name if qtype else None) == expected
    if qtype is not None:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert fmt.bits_per_weight((1, 256)) == size * 8 / block


def test_unrepresentable_formats_refused_by_layer(tmp_path):
    model = tiny_llama256()
    plan = Plan.from_dict({"default": {"format": "q4-k"}, "rules": [
        {"match": "model.layers.1.self_attn.v_proj", "format": "int4-g128"},
        {"match": "model.layers.0.mlp.up_proj", "format": "nf4-g64"}]})
    result = quantize_(model, plan)
    path = tmp_path / "x.gguf"
    with pytest.raises(PlanError) as err:
        export_gguf(model, result.layers, merging_tokenizer(), path)
    message = str(err.value)
    assert "2 planned layer(s)" in message
    assert "model.layers.1.self_attn.v_proj (int4-g128: no GGUF type)" in message
    assert "model.layers.0.mlp.up_proj (nf4-g64: no GGUF type)" in message
    assert not path.exists() and list(tmp_path.iterdir()) == []
    out = export_gguf(model, result.layers, merging_tokenizer(), path, float_fallback=True, float_type="f32")
    assert out.in_float == ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj")
    assert out.types["blk.1.attn_v.weight"] == "F32" and out.types["blk.1.attn_q.weight"] == "Q4_K"
    loaded, _ = load_gguf(path)  # in F32 the fallback layers are exact too
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_layers_whose_codes_are_not_the_weights_refused(tmp_path):
    model = tiny_llama256()
    result = quantize_(model, Plan.uniform("q4-k"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # a weight moved after quantization
    with pytest.raises(ExportError, match="model.layers.0.mlp.up_proj"):
        export_gguf(model, result.layers, merging_tokenizer(), tmp_path / "x.gguf")


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama256()
    result = quantize_(model, Plan.uniform("q4-k"))
    path = tmp_path / "x.gguf"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="exists"):
        export_gguf(model, result.layers, merging_tokenizer(), path)
    written = []
    original = gguf.GGUFWriter.write_tensor_data

    def full_disk(self, tensor, *args, **kwargs):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor.nbytes)
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
    with pytest.raises(ExportError, match="No space left on device"):
        export_gguf(model, result.layers, merging_tokenizer(), path, overwrite=True)
    assert len(written) == 3
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_source_gguf_metadata_and_unplanned_tensors(tmp_path):
    """A model loaded from a GGUF keeps the source's metadata, tokenizer and, for tensors the
    plan leaves alone, the source's own bytes (exact, in their types)."""
    model = tiny_llama256(tie=True)
    first = quantize_(model, Plan.from_dict({"default": {"format": "int4-fmin-g32"},
                                             "rules": [{"match": "model.embed_tokens", "format": "int8-sym-g32"}]}))
    source = export_gguf(model, first.layers, merging_tokenizer(), tmp_path / "source.gguf").path
    loaded, _ = load_gguf(source)
    plan = Plan.from_dict({"default": {"format": "q4-k"}, "skip": ["re:model.layers.1.*"]})
    result = quantize_(loaded, plan)
    out = export_gguf(loaded, result.layers, None, tmp_path / "out.gguf", source_gguf=source)
    assert out.types["blk.0.ffn_up.weight"] == "Q4_K"
    assert out.types["blk.1.ffn_up.weight"] == "Q4_1" and out.types["token_embd.weight"] == "Q8_0"  # source bytes
    src, new = gguf.GGUFReader(source), gguf.GGUFReader(out.path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.rope.freq_base", "general.name"):
        if key in src.fields:
            assert new.fields[key].contents() == src.fields[key].contents(), key
    again, _ = load_gguf(out.path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in again.state_dict().items())


def test_qwen2_exports_without_permutation(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = fp16_exact(Qwen2ForCausalLM(config).eval())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # non-zero q/k/v biases, stored in F32
    result = quantize_(model, Plan.from_dict({"default": {"format": "q5-k"},
                                              "rules": [{"match": "re:.*k_proj", "format": "int8-sym-g32"}]}))
    out = export_gguf(model, result.layers, byte_tokenizer(), tmp_path / "qwen.gguf")
    assert out.types["blk.0.attn_q.bias"] == "F32" and out.types["blk.0.attn_k.weight"] == "Q8_0"
    loaded, tokenizer = load_gguf(out.path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert tokenizer("héllo")["input_ids"] == byte_tokenizer()("héllo")["input_ids"]


def test_gemma3_stores_norms_shifted(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
    model = fp16_exact(Gemma3ForCausalLM(config).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # multiples of 2^-8: 1 + w is exact in float32
                p.copy_(torch.randint(-64, 64, p.shape) / 256)
    result = quantize_(model, Plan.from_dict({"default": {"format": "q4-k"},
                                              "rules": [{"match": "re:.*o_proj", "format": "int8-sym-g32"}]}))
    out = export_gguf(model, result.layers, byte_tokenizer(), tmp_path / "gemma.gguf")
    reader = gguf.GGUFReader(out.path)
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_q_norm.weight")
    assert np.array_equal(np.asarray(norm.data), model.model.layers[0].self_attn.q_norm.weight.detach().numpy() + 1)
    loaded, _ = load_gguf(out.path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
