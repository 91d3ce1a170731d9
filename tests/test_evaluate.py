"""Perplexity and KL against direct computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mixq.evaluate import kl_divergence, perplexity, perplexity_unbatched
from mixq.plan import Plan
from mixq.quantize import quantize_


@pytest.fixture
def win():
    return torch.randint(0, 300, (5, 32), generator=torch.Generator().manual_seed(0))


def test_perplexity_equals_model_loss(model, win):
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in win]  # HF's own shifted loss
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(model, win, batch_size=2)
    assert got.ppl == pytest.approx(expected, rel=1e-5)
    assert got.tokens == 5 * 31 and got.windows == 5
    assert perplexity_unbatched(model, win).ppl == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, win, batch_size=5).ppl == pytest.approx(got.ppl, rel=1e-6)


def test_kl_divergence(model, win):
    assert kl_divergence(model, model, win) == pytest.approx(0.0, abs=1e-7)
    q = copy.deepcopy(model)
    quantize_(q, Plan.uniform("int2-g32"))
    with torch.no_grad():
        p = F.log_softmax(model(win).logits.float(), -1)
        r = F.log_softmax(q(win).logits.float(), -1)
    expected = float((p.exp() * (p - r)).sum(-1).mean())
    got = kl_divergence(model, q, win, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-4) and got > 1e-3
