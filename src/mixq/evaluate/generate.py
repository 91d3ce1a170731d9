"""Text generation (greedy, or top-k sampling as the fourth seed does) and the perplexity a
reference model gives the generated tokens.

Decoding is a plain loop over the model's KV cache: one forward pass over the prompt, then
one per new token.  Greedy takes the arg-max logit (as transformers' ``generate`` with
``do_sample=False``); sampling keeps the ``top_k`` largest logits, softmaxes them and draws
from a ``torch.Generator`` seeded with ``seed``, so the same seed on the same device gives
the same text, and every plan of a comparison draws from the same random stream.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.errors import MixqError

TOP_K = 30  # the fourth seed's top_k


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 50
    sample: bool = False
    top_k: int = TOP_K
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MixqError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.top_k < 1:
            raise MixqError(f"--top-k must be positive, got {self.top_k}")

    def describe(self) -> dict[str, object]:
        if not self.sample:
            return {"mode": "greedy", "max_new_tokens": self.max_new_tokens}
        return {"mode": "sample", "top_k": self.top_k, "seed": self.seed, "max_new_tokens": self.max_new_tokens}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _next_token(logits: Tensor, decoding: Decoding, generator: torch.Generator | None) -> int:
    if generator is None:
        return int(torch.argmax(logits))
    values, index = torch.topk(logits, min(decoding.top_k, logits.numel()))
    pick = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
    return int(index[pick])


def _cache_name(model: nn.Module) -> str:
    """The KV cache's forward argument and output key: ``cache`` from transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_ids(model: nn.Module, prompt: Tensor, decoding: Decoding, *, eos: int | None = None) -> Tensor:
    """The new token ids (1-D) that ``model`` writes after ``prompt`` (1-D token ids); stops
    after ``eos`` (kept) or ``decoding.max_new_tokens`` tokens."""
    if prompt.numel() == 0:
        raise MixqError("the prompt is empty")
    device = _device(model)
    generator = torch.Generator(device=device).manual_seed(decoding.seed) if decoding.sample else None
    cache = _cache_name(model)
    out = model(input_ids=prompt.to(device).view(1, -1), use_cache=True)
    new: list[int] = []
    while True:
        token = _next_token(out.logits[0, -1].float(), decoding, generator)
        new.append(token)
        if token == eos or len(new) == decoding.max_new_tokens:
            return torch.tensor(new, dtype=torch.long)
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache: out[cache]})


@torch.no_grad()
def text_perplexity(model: nn.Module, prompt: Tensor, new: Tensor, *, score_prompt: bool = False) -> float:
    """exp(mean NLL) under ``model`` of the ``new`` tokens given the ``prompt`` (with
    ``score_prompt``: of every token after the first, prompt included, as the fourth seed's
    ``model(ids, labels=ids)`` does).  Scored on the token ids, not on re-tokenized text."""
    ids = torch.cat([prompt, new]).to(_device(model)).view(1, -1)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    start = 0 if score_prompt else prompt.numel() - 1
    return math.exp(float(nll[start:].double().mean()))


__all__ = ["Decoding", "TOP_K", "generate_ids", "text_perplexity"]
