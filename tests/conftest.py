"""Shared fixtures: tiny random models built from a transformers config, the data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama(*, tie: bool = True, vocab: int = 300, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a less trivial weight distribution than the init's
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture
def model():
    return tiny_llama()


def byte_tokenizer():
    """A byte-level tokenizer with no merges (256 tokens + specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a Hugging Face folder (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(" ".join(f"word{i % 37} and more text number {i}." for i in range(400)))
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = Path(os.environ.get("MIXQ_DATA_DIR", SHARED_DATA))
    if not (root / "wikitext2" / "test.raw").is_file():
        pytest.skip("WikiText-2 data directory not available")
    return root


@pytest.fixture(scope="session")
def wikitext_root() -> Path:
    """A data directory holding wikitext2/{test,validation}.raw: the shared one when there, else the
    excerpt shipped in the package, so tests that need a few windows of WikiText run on a fresh clone."""
    from mixq.data import EXCERPT

    root = Path(os.environ.get("MIXQ_DATA_DIR", SHARED_DATA))
    return root if (root / "wikitext2" / "test.raw").is_file() else Path(str(EXCERPT))
