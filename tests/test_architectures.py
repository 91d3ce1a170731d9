"""The architecture matrix: every command on a tiny random model of each supported family.

Each family is a 2-block model (hidden 64, vocab 300) saved once per session as a Hugging
Face folder with a byte-level tokenizer.  Through ``mixq.cli.main``: ``eval`` with RTN, GPTQ,
QuantEase and QuantEase with 1% outliers; ``sensitivity --method fit``; a 4-trial random
``search``; ``quantize`` and the saved model evaluated again.  Each checks that the quantized
weights are every matrix of the model but the embeddings, lm_head and MoE routers (counted
here from the parameters, not by mixq) and, after reload, the in-memory perplexity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import byte_tokenizer
from mixq.cli import main

_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
#: family -> (config class, model class, config arguments), all from transformers
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_COMMON, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_COMMON, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_COMMON, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_COMMON, "head_dim": 16, "sliding_window": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {**_COMMON, "head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=300, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=4)),
    "falcon-new": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, num_kv_heads=2,
                                                             new_decoder_architecture=True)),
    "falcon-old": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, new_decoder_architecture=False,
                                                             multi_query=True, parallel_attn=True)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=300, hidden_size=64, intermediate_size=96,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=128)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=256, eos_token_id=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {**_COMMON, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "decoder_sparse_step": 1, "mlp_only_layers": []}),
}
FORMAT = "int4-g32"  # groups of 32 fit every row of these models (the narrowest is 32 wide)
SMALL = ["--seqlen", "32", "--batch-size", "2", "--device", "cpu", "--json"]
PLANS = {"rtn": {"solver": "rtn"}, "gptq": {"solver": "gptq"},
         "quantease": {"solver": "quantease", "options": {"iterations": 4}}}


def build(family: str) -> nn.Module:
    import transformers

    config_cls, model_cls, kwargs = ARCHITECTURES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    with torch.no_grad():  # a less trivial weight distribution than the init's
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


def matrix_elements(model: nn.Module) -> int:
    """Elements of every weight matrix but the embeddings, lm_head and MoE routers (``mlp.gate``)."""
    skip = {id(model.get_output_embeddings().weight)}
    skip |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() >= 2 and id(p) not in skip and not n.endswith("mlp.gate.weight"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models' matrices are a few kB, and a second thread that spins
    while another process holds the core made the module many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """A saved tiny model per family, made once per session."""
    made: dict[str, tuple[Path, int]] = {}

    def get(family: str) -> tuple[Path, int]:
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            model = build(family)
            model.save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            made[family] = (path, matrix_elements(model))
        return made[family]

    return get


@pytest.fixture(scope="session")
def wiki_dir(tmp_path_factory) -> Path:
    """A data directory with a small WikiText-2 look-alike (test and validation)."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    for split, shift in (("test", 0), ("validation", 11)):
        lines = [f" word{(i + shift) % 37} and more text number {i} ." for i in range(300)]
        (root / "wikitext2" / f"{split}.raw").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def plan_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plans")
    out = {}
    for name, spec in PLANS.items():
        out[name] = root / f"{name}.yaml"
        out[name].write_text(json.dumps({"default": {"format": FORMAT, **spec}}))
    return out


def _rows(capsys, argv: list[str]) -> list[dict]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"mixq {' '.join(argv[:1])} exited {code}: {err.strip().splitlines()[-1:]}"
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_eval_every_solver_then_quantize_and_reload(family, family_dir, wiki_dir, plan_files, capsys, tmp_path):
    path, elements = family_dir(family)
    data = ["--data-dir", str(wiki_dir), "--nsamples", "4", "--limit", "2", *SMALL]
    plans = ",".join(["base", *(str(plan_files[p]) for p in PLANS)])
    rows = _rows(capsys, ["eval", "--model", str(path), "--plan", plans, *data])
    rows += _rows(capsys, ["eval", "--model", str(path), "--plan", FORMAT, "--solver", "quantease", "--outliers", "0.01",
                           "--option", "iterations=4", *data])
    base, quantized = rows[0], rows[1:]
    assert base["size"]["quantized_weights"] == 0 and len(quantized) == 4
    for row in quantized:
        assert row["size"]["quantized_weights"] == elements, row["plan"]
        assert math.isfinite(row["ppl"]) and row["ppl"] != base["ppl"], row["plan"]
    assert quantized[3]["bits_per_weight"] > quantized[2]["bits_per_weight"]  # the outliers are counted

    out = tmp_path / "q"
    record = _rows(capsys, ["quantize", "--model", str(path), "--plan", str(plan_files["gptq"]), "--out", str(out),
                            *data])[0]
    assert record["quantized_weights"] == elements
    reloaded = _rows(capsys, ["eval", "--model", str(out / "model"), "--plan", "base", *data])[0]
    assert reloaded["ppl"] == pytest.approx(quantized[1]["ppl"], rel=1e-6)  # the GPTQ row of the same plan


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_sensitivity_scores_every_matrix(family, family_dir, wiki_dir, capsys, tmp_path):
    path, elements = family_dir(family)
    out = tmp_path / "sens.json"
    _rows(capsys, ["sensitivity", "--model", str(path), "--method", "fit", "--formats", f"{FORMAT},int8",
                   "--data-dir", str(wiki_dir), "--nsamples", "2", *SMALL, "--out", str(out)])
    layers = json.loads(out.read_text())["layers"]
    assert sum(d["params"] for d in layers.values()) == elements
    assert all(d["fit"]["trace"] > 0 for d in layers.values())  # every matrix is in the loss's graph


@pytest.mark.parametrize("family", ARCHITECTURES)
def test_search_covers_every_matrix(family, family_dir, wiki_dir, capsys, tmp_path):
    from mixq.models import load_model
    from mixq.plan import Plan

    path, elements = family_dir(family)
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"granularity": "block", "choices": ["int3-g32", FORMAT, "int8"]}))
    run = tmp_path / "run"
    _rows(capsys, ["search", "--model", str(path), "--space", str(space), "--backend", "random", "--trials", "4",
                   "--max-bits", "6", "--run-dir", str(run), "--data-dir", str(wiki_dir), "--limit", "1",
                   "--final-limit", "1", *SMALL])
    trials = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    model = load_model(path).model
    assert len(trials) == 4
    for t in trials:
        assert Plan.from_dict(t["plan"]).size_report(model).quantized_weights == elements


# -- encoders on the causal path -------------------------------------------------------------
def _save(path: Path, model_cls: str, config_cls: str = "BertConfig", **config) -> Path:
    import transformers

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**base, **config})).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_the_causal_loader_refuses_encoders_and_other_heads(tmp_path):
    from mixq.errors import ModelError
    from mixq.models import load_model

    for cls in ("BertModel", "BertForSequenceClassification", "BertLMHeadModel"):
        with pytest.raises(ModelError, match="is an encoder.*mixq embed-eval"):
            load_model(_save(tmp_path / cls, cls))
    with pytest.raises(ModelError, match="LlamaForSequenceClassification, not a causal LM"):
        load_model(_save(tmp_path / "llama-cls", "LlamaForSequenceClassification", "LlamaConfig", pad_token_id=0))
    decoder = load_model(_save(tmp_path / "bert-decoder", "BertLMHeadModel", is_decoder=True))  # a causal BERT
    assert type(decoder.model).__name__ == "BertLMHeadModel"


def test_quantize_keeps_a_classification_head(tmp_path):
    """``load_for_quantize`` loads the folder's own class; the head is calibrated like any layer."""
    from mixq.models import load_for_quantize
    from mixq.plan import LayerSpec, Plan
    from mixq.quantize import quantize_

    folder = _save(tmp_path / "bert-cls", "BertForSequenceClassification", num_labels=3)
    model = load_for_quantize(folder).model
    assert type(model).__name__ == "BertForSequenceClassification"
    ids = torch.randint(0, 257, (6, 16), generator=torch.Generator().manual_seed(4))
    head = model.classifier.weight.detach().clone()
    plan = Plan(rules=(("classifier", LayerSpec.of("int4-g32", "gptq")),), default=LayerSpec.of("int4-g32", "gptq"))
    layer = quantize_(model, plan, calibration=ids, batch_size=3).layers["classifier"]
    assert layer.rel_error < layer.rtn_rel_error and not torch.equal(model.classifier.weight, head)
    model.save_pretrained(tmp_path / "out")
    reloaded = load_for_quantize(tmp_path / "out").model
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
