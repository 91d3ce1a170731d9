"""The command line: JSON results, saved models, one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import tiny_llama
from mixq.cli import main

EVAL = ["--seqlen", "32", "--limit", "3", "--device", "cpu", "--json"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_formats_json(capsys):
    code, out, _ = _run(capsys, "formats", "--json", "--cols", "576")
    data = json.loads(out)
    assert code == 0
    assert data["formats"]["mxfp4"] == 4.25 and data["formats"]["int4-g128"] == pytest.approx(4 + 5 * 20 / 576)
    assert "int" in data["families"] and "nf" in data["families"]


def _bits_per_weight(model, bits_of) -> float:  # type: ignore[no-untyped-def]
    """Bits per weight over the blocks' Linear layers, each layer's bits ``bits_of(rows, cols, name)``."""
    layers = [(n, m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return sum(bits_of(r, c, n) for n, (r, c) in layers) / sum(r * c for _, (r, c) in layers)


def _by_hand(tiny_dir, text_file, plan: str | None):  # type: ignore[no-untyped-def]
    """Perplexity and KL to the base on the CLI's windows, computed without mixq's evaluation code:
    the text tokenized whole, cut into 3 windows of 32, transformers' own loss and softmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixq.plan import Plan
    from mixq.quantize import quantize_

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(text_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    win = ids[: 3 * 32].reshape(3, 32)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    if plan:
        quantize_(model, Plan.parse(plan))
    with torch.no_grad():
        nll = torch.stack([model(w[None], labels=w[None]).loss for w in win]).double().mean()
        p, q = (torch.log_softmax(m(win).logits.double(), -1) for m in (base, model))
    return math.exp(float(nll)), float((p.exp() * (p - q)).sum() / win.numel())


def test_eval_json_with_provenance(capsys, tiny_dir, text_file):
    code, out, _ = _run(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", "base,int8,int2-g32", "--kl", *EVAL)
    assert code == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["label"] for r in rows] == ["base", "int8", "int2-g32"]
    base, int8, int2 = rows
    assert base["bits_per_weight"] == 16.0 and base["kl"] == 0.0
    # int8 per channel: 8 bits a weight, a 16-bit scale and an 8-bit zero point a row
    assert int8["bits_per_weight"] == _bits_per_weight(tiny_llama(), lambda r, c, _: 8 * r * c + 24 * r)
    assert int2["size_bytes"] < int8["size_bytes"] < base["size_bytes"]
    assert base["windows"] == 3 and base["tokens"] == 3 * 31 and base["data_source"] == "file"
    for row, plan in zip(rows, (None, "int8", "int2-g32")):
        ppl, kl = _by_hand(tiny_dir, text_file, plan)
        assert row["ppl"] == pytest.approx(ppl, rel=1e-5) and row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert int2["kl"] > 100 * int8["kl"] > 0
    prov = base["provenance"]
    assert len(prov["model"]["sha256"]) == 64 and prov["seed"] == 0 and "eval" in prov["command"]
    assert prov["versions"]["torch"] and prov["mixq"]


def test_quantize_saves_a_model_that_evaluates_the_same(capsys, tiny_dir, text_file, tmp_path):
    out_dir = tmp_path / "q"
    code, out, _ = _run(capsys, "quantize", "--model", str(tiny_dir), "--plan", "int4-g32", "--out", str(out_dir), "--json", "--device", "cpu")
    assert code == 0
    record = json.loads(out)
    assert (out_dir / "plan.yaml").is_file() and (out_dir / "codes.safetensors").is_file()
    assert json.loads((out_dir / "result.json").read_text())["size_bytes"] == record["size_bytes"]
    _, a, _ = _run(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", "int4-g32", *EVAL)
    _, b, _ = _run(capsys, "eval", "--model", str(out_dir / "model"), "--dataset", str(text_file), *EVAL)
    assert json.loads(a)["ppl"] == pytest.approx(json.loads(b)["ppl"], rel=1e-6)


def test_plan_file(capsys, tiny_dir, text_file, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("default: int4-g32\nrules:\n  - {match: 're:.*down_proj', format: int8}\n")
    code, out, _ = _run(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", str(plan), *EVAL)
    # int4-g32: 4 bits a weight, a 16-bit scale and a 4-bit zero point per group of 32; down_proj int8 per channel
    expected = _bits_per_weight(tiny_llama(), lambda r, c, n: 8 * r * c + 24 * r if n.endswith("down_proj")
                                else 4 * r * c + 20 * r * (c // 32))
    assert code == 0 and json.loads(out)["bits_per_weight"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "no-such-model"], "model not found: 'no-such-model'"),
    (["eval", "--model", "/nonexistent/m.gguf"], "model not found"),
    (["eval", "--plan", "int4-banana"], "unknown option 'banana'"),
    (["eval", "--plan", "int12"], "2 to 8 bits"),
    (["eval", "--plan", "q4km"], "unknown format"),
])
def test_bad_input_one_line_exit_2(capsys, argv, message, text_file):
    code, out, err = _run(capsys, *argv, "--dataset", str(text_file))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("mixq: error:")


def test_corrupt_gguf(capsys, tmp_path, text_file):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    code, _, err = _run(capsys, "eval", "--model", str(bad), "--dataset", str(text_file))
    assert code == 2 and "broken.gguf" in err and len(err.strip().splitlines()) == 1
    bad.write_bytes(b"not a gguf at all")
    code, _, err = _run(capsys, "eval", "--model", str(bad), "--dataset", str(text_file))
    assert code == 2 and "not a GGUF file" in err


def test_plan_errors_against_the_model(capsys, tiny_dir, text_file, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("rules:\n  - {match: model.layers.7.mlp.up_proj, format: int8}\n")
    code, _, err = _run(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", str(plan), *EVAL)
    assert code == 2 and "names no existing layer" in err
    code, _, err = _run(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", "int4-g128", *EVAL)
    assert code == 2 and "exceeds the row width 64" in err
    code, _, err = _run(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", "bfp4-g64", *EVAL)
    assert code == 2 and "does not divide the row width 96" in err


def test_no_traceback_from_the_real_entry_point(tmp_path, text_file):
    proc = subprocess.run([sys.executable, "-m", "mixq.cli", "eval", "--model", "no-such-model", "--dataset", str(text_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("mixq: error:")


def test_eval_on_the_packaged_excerpt_says_so(capsys, tiny_dir, monkeypatch):
    """No data directory, offline: wikitext2 is the excerpt, and the output says so everywhere."""
    monkeypatch.delenv("MIXQ_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = _run(capsys, "eval", "--model", str(tiny_dir), "--plan", "base", *EVAL)
    row = json.loads(out)
    assert code == 0 and row["data_source"] == "excerpt" and row["windows"] == 3
    assert row["dataset_note"] == ("wikitext2/test: no data directory given; using the packaged excerpt (322 lines of "
                                   "the test split, CC BY-SA 4.0); perplexities are not comparable with the full split")
    assert row["dataset_note"] in err
    code, out, _ = _run(capsys, "eval", "--model", str(tiny_dir), "--plan", "base", *EVAL[:-1])
    assert code == 0 and "wikitext2/test (packaged excerpt)" in " ".join(out.split())  # the title, however wrapped
