"""Sentence embeddings of an encoder and how far a quantized one drifts from its base.

An embedding pools the encoder's last hidden states as the model's sentence-transformers
configuration says (all-MiniLM-L6-v2: the mean over the attention mask, then L2
normalisation, sentences truncated at 256 tokens).  Two sets of embeddings of the same
sentences are compared by

- the cosine similarity of each sentence's two embeddings (mean and minimum), and
- top-1 agreement: the fraction of sentences whose nearest neighbour (cosine, among the
  other sentences) is the same sentence under both.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.errors import DataError, ModelError

#: sentence-transformers' pooling flags for the modes supported here
POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
POOLING_MODES = tuple(POOLING_FLAGS)
_SENTENCE_END = re.compile(r"(?<= [.!?]) +")  # WikiText sets sentence-final marks apart: "actor . He"
_WIKITEXT_MARKS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}  # its escaped in-word hyphens and separators


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector."""

    mode: str = "mean"
    normalize: bool = True
    max_length: int | None = None  # tokens per sentence at most (None: the model's position limit)

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ModelError(f"pooling {self.mode!r} is not supported (one of {', '.join(POOLING_MODES)})")

    @classmethod
    def from_folder(cls, folder: str | Path) -> Pooling:
        """Read a sentence-transformers folder (``modules.json``, the pooling config,
        ``sentence_bert_config.json``); a plain Hugging Face folder gets the defaults."""
        folder = Path(folder)
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = _read_json(modules_file)
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
        mode = "mean"
        if "Pooling" in kinds:
            config = _read_json(folder / kinds["Pooling"].get("path", "") / "config.json")
            on = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
            modes = [m for m, flag in POOLING_FLAGS.items() if flag in on]
            if len(on) != 1 or len(modes) != 1:
                raise ModelError(f"{folder}: pooling {on} is not supported (one of {', '.join(POOLING_FLAGS.values())})")
            mode = modes[0]
        st_config = folder / "sentence_bert_config.json"
        max_length = _read_json(st_config).get("max_seq_length") if st_config.is_file() else None
        return cls(mode, "Normalize" in kinds, None if max_length is None else int(max_length))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "normalize": self.normalize, "max_length": self.max_length}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


# -- sentences ---------------------------------------------------------------------------
def text_sentences(text: str, *, limit: int | None = None, min_words: int = 4) -> list[str]:
    """Distinct sentences of a WikiText-style text, in order, the first ``limit`` only.

    Each non-empty line that is not a ``= heading =`` is split after a free-standing
    ``.``, ``!`` or ``?``; WikiText's ``@-@``, ``@,@`` and ``@.@`` are joined back; sentences
    shorter than ``min_words`` words and repeats are dropped (a repeat would be its own
    nearest neighbour).
    """
    out: list[str] = []
    seen: set[str] = set()
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for part in _SENTENCE_END.split(line):
            for mark, joined in _WIKITEXT_MARKS.items():
                part = part.replace(mark, joined)
            part = part.strip()
            if len(part.split()) < min_words or part in seen:
                continue
            seen.add(part)
            out.append(part)
            if limit is not None and len(out) >= limit:
                return out
    return out


def sample_sentences(sentences: Sequence[str], n: int, *, seed: int = 0) -> list[str]:
    """``n`` sentences drawn without replacement (``random.Random(seed).sample``)."""
    if n > len(sentences):
        raise DataError(f"asked for {n} calibration sentences, the text has {len(sentences)}")
    return random.Random(seed).sample(list(sentences), n)


def sentence_batch(tokenizer: Any, sentences: Sequence[str], *, max_length: int) -> dict[str, Tensor]:
    """A right-padded token batch (``input_ids``, ``attention_mask``...), truncated at ``max_length``."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items()}


# -- embeddings --------------------------------------------------------------------------
def pool(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """Sentence vectors ``[batch, dim]`` (fp32) from token states ``[batch, seq, dim]`` and the attention mask."""
    hidden = hidden.float()
    m = mask.to(hidden.device, torch.float32).unsqueeze(-1)
    if pooling.mode == "mean":
        out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)  # sentence-transformers' clamp
    elif pooling.mode == "cls":
        out = hidden[:, 0]
    else:
        out = hidden.masked_fill(m == 0, -1e9).amax(dim=1)
    return F.normalize(out, p=2, dim=1) if pooling.normalize else out


def max_length_of(model: nn.Module, pooling: Pooling) -> int:
    limit = getattr(model.config, "max_position_embeddings", 512)
    return min(pooling.max_length or limit, limit)


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, pooling: Pooling, batch_size: int = 32,
           max_length: int | None = None) -> Tensor:
    """Embeddings ``[n, dim]`` (fp32, on the CPU) of ``sentences``, in their order.

    Sentences are batched by length (as sentence-transformers does) so little is padded.
    """
    if not sentences:
        raise DataError("no sentences to embed")
    device = next(model.parameters()).device
    length = max_length or max_length_of(model, pooling)
    enc = tokenizer(list(sentences), truncation=True, max_length=length)
    order = sorted(range(len(sentences)), key=lambda i: -len(enc["input_ids"][i]))
    out = torch.empty(len(sentences), model.config.hidden_size, dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({k: [enc[k][i] for i in rows] for k in enc.keys()}, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        out[rows] = pool(hidden, batch["attention_mask"], pooling).cpu()
    return out


# -- comparing two sets of embeddings ----------------------------------------------------
def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two ``[n, dim]`` tensors."""
    if a.shape != b.shape:
        raise DataError(f"embeddings of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def nearest_neighbours(emb: Tensor) -> Tensor:
    """For each row, the index of the most cosine-similar other row (ties: the lowest index)."""
    if emb.shape[0] < 2:
        raise DataError("nearest neighbours need at least two sentences")
    unit = F.normalize(emb.double(), p=2, dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def top1_agreement(base: Tensor, other: Tensor) -> float:
    """Fraction of rows whose nearest neighbour is the same under both embeddings."""
    return float((nearest_neighbours(base) == nearest_neighbours(other)).double().mean())


@dataclass(frozen=True)
class EmbeddingDrift:
    """How a quantized encoder's embeddings differ from its base's on the same sentences."""

    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    sentences: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean_cosine": self.mean_cosine, "min_cosine": self.min_cosine,
                "top1_agreement": self.top1_agreement, "sentences": self.sentences}


def compare(base: Tensor, other: Tensor) -> EmbeddingDrift:
    cos = cosine(base, other)
    return EmbeddingDrift(float(cos.mean()), float(cos.min()), top1_agreement(base, other), int(base.shape[0]))


__all__ = ["EmbeddingDrift", "Pooling", "compare", "cosine", "encode", "max_length_of", "nearest_neighbours", "pool",
           "sample_sentences", "sentence_batch", "text_sentences", "top1_agreement"]
