"""mixq generate: greedy decoding is transformers' greedy, sampling is reproducible by seed, the
base model's perplexity of the text is the one its own loss gives."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from mixq.commands import generate as cmd
from mixq.errors import MixqError
from mixq.evaluate.generate import Decoding, generate_ids, text_perplexity

PROMPT = torch.tensor([5, 17, 42, 99])


def _run(capsys, *argv: str) -> dict:
    p = argparse.ArgumentParser()
    p.set_defaults(command_line="mixq generate")
    cmd.add_parser(p.add_subparsers())
    assert cmd.run(p.parse_args(["generate", *argv])) == 0
    return json.loads(capsys.readouterr().out)


def test_greedy_is_transformers_greedy(model):
    eos = model.generation_config.eos_token_id
    new = generate_ids(model, PROMPT, Decoding(max_new_tokens=20), eos=eos)
    ref = model.generate(PROMPT.view(1, -1), do_sample=False, max_new_tokens=20, eos_token_id=eos, pad_token_id=0,
                         attention_mask=torch.ones(1, PROMPT.numel(), dtype=torch.long))
    assert new.tolist() == ref[0, PROMPT.numel():].tolist()
    assert len(new) == 20 or new[-1] == eos


def test_sampling_is_reproducible_by_seed_and_differs_from_greedy(model):
    draw = lambda seed: generate_ids(model, PROMPT, Decoding(max_new_tokens=16, sample=True, top_k=30, seed=seed))  # noqa: E731
    a, b, c = draw(3), draw(3), draw(4)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert a.tolist() != generate_ids(model, PROMPT, Decoding(max_new_tokens=16)).tolist()


def test_top_k_one_is_greedy(model):
    sampled = generate_ids(model, PROMPT, Decoding(max_new_tokens=12, sample=True, top_k=1, seed=7))
    assert sampled.tolist() == generate_ids(model, PROMPT, Decoding(max_new_tokens=12)).tolist()


def test_perplexity_is_the_models_own_loss(model):
    new = generate_ids(model, PROMPT, Decoding(max_new_tokens=10))
    ids = torch.cat([PROMPT, new]).view(1, -1)
    with torch.no_grad():
        loss_all = model(ids, labels=ids).loss
        labels = ids.clone()
        labels[0, : PROMPT.numel()] = -100  # ignored: the prompt is not scored
        loss_new = model(ids, labels=labels).loss
    assert text_perplexity(model, PROMPT, new, score_prompt=True) == pytest.approx(math.exp(loss_all), rel=1e-5)
    assert text_perplexity(model, PROMPT, new) == pytest.approx(math.exp(loss_new), rel=1e-5)


def test_bad_decoding_options():
    with pytest.raises(MixqError, match="--max-new-tokens"):
        Decoding(max_new_tokens=0)
    with pytest.raises(MixqError, match="--top-k"):
        Decoding(top_k=0)


def test_cli_json_rows_and_reproducible_samples(capsys, tiny_dir):
    from transformers import AutoModelForCausalLM

    common = ["--model", str(tiny_dir), "--prompt", "I have a dream", "--max-new-tokens", "12", "--device", "cpu",
              "--json"]
    out = _run(capsys, *common, "--plan", "base,int8,int2-g32")
    assert set(out) >= {"model", "prompt", "prompt_tokens", "decoding", "scored", "rows", "provenance"}
    assert out["decoding"] == {"mode": "greedy", "max_new_tokens": 12}
    assert out["scored"] == "perplexity under the base model of the generated tokens given the prompt"
    assert [r["label"] for r in out["rows"]] == ["base", "int8", "int2-g32"]
    base, int8, int2 = out["rows"]
    assert base["bits_per_weight"] == 16.0 and int2["bits_per_weight"] < int8["bits_per_weight"] < 16
    assert len(out["prompt_tokens"]) == len("I have a dream")  # a byte-level tokenizer without merges
    # the base row is transformers' greedy continuation of the same prompt
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompt = torch.tensor(out["prompt_tokens"]).view(1, -1)
    ref = hf.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=256, pad_token_id=256,
                      attention_mask=torch.ones_like(prompt))
    assert base["new_tokens"] == ref[0, prompt.numel():].tolist()
    assert base["text"].startswith("I have a dream") and base["text"].endswith(base["continuation"])
    for r in out["rows"]:
        assert 1 <= len(r["new_tokens"]) <= 12 and r["base_ppl"] > 1.0
    assert base["base_ppl"] == pytest.approx(text_perplexity(hf, prompt[0], torch.tensor(base["new_tokens"])), rel=1e-5)
    # sampling: the same seed gives the same text, another seed another
    a = _run(capsys, *common, "--plan", "base", "--sample", "--seed", "5")
    b = _run(capsys, *common, "--plan", "base", "--sample", "--seed", "5")
    c = _run(capsys, *common, "--plan", "base", "--sample", "--seed", "6")
    assert a["decoding"] == {"mode": "sample", "top_k": 30, "seed": 5, "max_new_tokens": 12}
    assert a["rows"][0]["new_tokens"] == b["rows"][0]["new_tokens"] != c["rows"][0]["new_tokens"]


def test_cli_table(capsys, tiny_dir):
    p = argparse.ArgumentParser()
    p.set_defaults(command_line="mixq generate")
    cmd.add_parser(p.add_subparsers())
    assert cmd.run(p.parse_args(["generate", "--model", str(tiny_dir), "--plan", "base,int4-g32",
                                 "--max-new-tokens", "5", "--device", "cpu"])) == 0
    out = capsys.readouterr().out
    assert "base ppl" in out and "int4-g32" in out and "greedy" in out
