"""Zero-shot tasks through lm-eval: same numbers as a direct log-likelihood computation, offline."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from conftest import byte_tokenizer, tiny_llama
from mixq.errors import DataError
from mixq.evaluate.zeroshot import evaluate_tasks, resolve_tasks

MC = [  # ten short multiple-choice questions (llm-foundry layout)
    {"query": f"Question {i}: which word follows {w}?", "choices": c, "gold": g}
    for i, (w, c, g) in enumerate([
        ("red", ["blue", "green sky", "x"], 0), ("one", ["two", "three"], 1), ("cat", ["dog", "a mouse", "bird"], 2),
        ("up", ["down", "left"], 0), ("hot", ["cold", "warm", "boiling water"], 1), ("day", ["night", "noon"], 0),
        ("tea", ["coffee", "milk", "juice"], 2), ("sun", ["moon", "star"], 1), ("big", ["small", "huge", "tiny"], 0),
        ("yes", ["no", "maybe"], 1)])
]
LM = [{"context": f"The {w} jumped over the", "continuation": c} for w, c in
      [("fox", "dog"), ("cow", "moon"), ("cat", "fence"), ("boy", "wall"), ("girl", "rope")]]
LM.append({"context": "A line that ends in a space ", "continuation": "here"})  # no second space


@pytest.fixture
def zs_dir(tmp_path):
    root = tmp_path / "data"
    (root / "zeroshot").mkdir(parents=True)
    (root / "zeroshot" / "arc_easy.jsonl").write_text("\n".join(json.dumps(r) for r in MC) + "\n")
    (root / "zeroshot" / "lambada_openai.jsonl").write_text("\n".join(json.dumps(r) for r in LM) + "\n")
    return root


def _loglik(model, tok, context: str, continuation: str, bos: bool) -> tuple[float, bool]:
    """Sum log p(continuation | context) and whether it is the greedy prediction, computed directly."""
    n_space = len(context) - len(context.rstrip())  # trailing spaces move to the continuation (lm-eval's rule)
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    prefix = [tok.bos_token_id] if bos else []
    ids = torch.tensor([prefix + ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    start = len(prefix) + len(ctx)
    pos = torch.arange(start - 1, ids.shape[1] - 1)
    target = ids[0, start:]
    ll = logp[pos, target].sum().item()
    greedy = bool((logp[pos].argmax(-1) == target).all())
    return ll, greedy


def bos_tokenizer():
    """The byte tokenizer, adding BOS when asked for special tokens (as Gemma's does)."""
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("bos", [False, True])
def test_local_tasks_match_direct_loglikelihood(zs_dir, bos):
    model, tok = tiny_llama(seed=3), bos_tokenizer()
    res = evaluate_tasks(model, tok, ["arc_easy", "local_lambada_openai"], data_dir=zs_dir, batch_size=3,
                         add_bos=bos)
    acc = acc_norm = 0
    for doc in MC:
        lls = [_loglik(model, tok, doc["query"], " " + c, bos)[0] for c in doc["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == doc["gold"]
    arc = res["arc_easy"]
    assert arc["n"] == len(MC) and arc["task"] == "local_arc_easy"
    assert arc["acc"] == pytest.approx(acc / len(MC))
    assert arc["acc_norm"] == pytest.approx(acc_norm / len(MC))
    p = acc / len(MC)
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(MC) - 1)))

    lls, greedy = zip(*(_loglik(model, tok, d["context"], ("" if d["context"][-1].isspace() else " ") + d["continuation"],
                                bos) for d in LM))
    lam = res["local_lambada_openai"]
    assert lam["acc"] == pytest.approx(sum(greedy) / len(LM))
    assert lam["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(LM)), rel=1e-4)


def test_limit_caps_examples(zs_dir):
    res = evaluate_tasks(tiny_llama(), byte_tokenizer(), ["arc_easy"], data_dir=zs_dir, limit=4)
    assert res["arc_easy"]["n"] == 4


def test_offline_never_opens_a_socket(zs_dir, monkeypatch):
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    res = evaluate_tasks(tiny_llama(), byte_tokenizer(), ["arc_easy", "lambada_openai"],
                         data_dir=zs_dir, limit=3)
    assert res["arc_easy"]["n"] == 3 and attempts == []


def test_missing_task_file_names_it(zs_dir):
    with pytest.raises(DataError, match=r"zeroshot/piqa\.jsonl"):
        resolve_tasks(["arc_easy", "piqa"], zs_dir)
    with pytest.raises(DataError, match="unknown local task"):
        resolve_tasks(["local_nope"], zs_dir)
    refs = resolve_tasks(["arc_easy", "hellaswag"], zs_dir)  # hub names pass straight through
    assert [(r.name, r.local) for r in refs] == [("local_arc_easy", True), ("hellaswag", False)]


def test_shipped_task_files_cover_the_data_readme():
    from mixq.evaluate.zeroshot import LOCAL, TASK_DIR

    assert {p.stem for p in TASK_DIR.glob("local_*.yaml")} == {f"local_{t}" for t in LOCAL}


def test_eval_cli_tasks_json(zs_dir, tiny_dir, capsys):
    from mixq.cli import main

    (zs_dir / "wikitext2").mkdir()
    (zs_dir / "wikitext2" / "test.raw").write_text(" = Title = \n\n" + "Some words of text here . " * 200 + "\n")
    rc = main(["eval", "--model", str(tiny_dir), "--data-dir", str(zs_dir), "--tasks", "wikitext2,arc_easy,lambada_openai",
               "--plan", "base,int8", "--limit", "3", "--seqlen", "64", "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["base", "int8"]
    for r in rows:
        assert list(r["tasks"]) == ["wikitext2", "arc_easy", "lambada_openai"]  # keyed by the names given
        assert r["tasks"]["arc_easy"]["n"] == 3 and 0.0 <= r["tasks"]["arc_easy"]["acc"] <= 1.0
        assert "acc_stderr" in r["tasks"]["arc_easy"] and "acc_norm" in r["tasks"]["arc_easy"]
        assert r["tasks"]["wikitext2"]["ppl"] == r["ppl"] and r["windows"] == 3  # perplexity keys stay at the top
    assert rows[1]["bits_per_weight"] < rows[0]["bits_per_weight"]


def test_eval_cli_missing_task_file_fails_before_loading(zs_dir, capsys):
    from mixq.cli import main

    rc = main(["eval", "--model", "/nonexistent/model", "--data-dir", str(zs_dir), "--tasks", "piqa"])
    err = capsys.readouterr().err
    assert rc == 2 and "piqa.jsonl" in err and "model not found" not in err
