"""``mixq bench-speed`` argument handling and the measuring loop (CPU: fake-quant smoke runs)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import tiny_llama
from mixq.commands import bench_speed
from mixq.errors import MixqError
from mixq.runtime.speed import Decoder, decode_speed, random_model


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    bench_speed.add_parser(sub)
    return p.parse_args([bench_speed.NAME, *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch", "1,x"], "--batch '1,x': expected comma-separated integers"),
    (["--batch", "0"], "expected positive integers"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["--layers", "2"], "--layers applies to --random-weights only"),
    (["--plan", " , "], "--plan is empty"),
    (["--device", "cpu"], "add --no-graphs"),
    (["--device", "cpu", "--no-graphs", "--kernels", "required"], "--kernels required needs CUDA"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(MixqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench_speed.run(_parse(["--device", "cpu", "--no-graphs", *argv] if "--device" not in argv else argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_no_cuda_is_a_clear_error():
    with pytest.raises(MixqError, match="no CUDA device is visible"):
        bench_speed.run(_parse(["--random-weights", "llama3-8b"]))


def test_bad_plan_refused_before_the_model_loads():
    with pytest.raises(MixqError, match="neither a plan file nor a preset"):
        bench_speed.run(_parse(["--device", "cpu", "--no-graphs", "--model", "/nonexistent", "--plan", "int9-g7"]))


def test_mutually_exclusive_sources():
    with pytest.raises(SystemExit):
        _parse(["--model", "smollm2-135m", "--random-weights", "llama3-8b"])


def test_decoder_follows_greedy_generate():
    """The static-cache loop produces the tokens transformers' greedy generate does."""
    model = tiny_llama(tie=False)
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, 5:]
        dec = Decoder(model, prompt, max_len=16)
        got = [dec.tok.clone()]
        for _ in range(5):
            dec.step()
            got.append(dec.tok.clone())
    assert torch.equal(torch.cat(got, dim=1), ref)
    assert dec.pos.tolist() == [[10], [10]]


def test_decode_speed_counts_tokens():
    model = tiny_llama(tie=False)
    d = decode_speed(model, batch=3, prompt=4, steps=5, warmup=1, graphs=False)
    assert (d.batch, d.steps, d.prompt) == (3, 5, 4)
    assert d.tokens_per_s == pytest.approx(15 / d.seconds) and d.ms_per_step == pytest.approx(200 * d.seconds)
    with pytest.raises(MixqError, match="CUDA graphs need a CUDA model"):
        decode_speed(model, batch=1, graphs=True)


def test_random_model_shapes():
    m = random_model("smollm2-135m", device="meta", layers=2)
    assert m.config.num_hidden_layers == 2 and m.lm_head.weight.shape == (49152, 576)
    assert m.model.layers[0].mlp.down_proj.weight.shape == (576, 1536)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # SmolLM2 ties its head
    big = random_model("llama3-8b", device="meta", layers=1)
    assert big.model.layers[0].self_attn.k_proj.weight.shape == (1024, 4096)
    assert big.model.layers[0].mlp.gate_proj.weight.shape == (14336, 4096)
    with pytest.raises(MixqError, match="unknown model shape"):
        random_model("gpt5", device="meta")


def test_cpu_smoke_run(capsys, tmp_path):
    out = tmp_path / "speed.json"
    args = _parse(["--random-weights", "smollm2-135m", "--layers", "1", "--device", "cpu", "--no-graphs",
                   "--plan", "base,int4-g32", "--batch", "1,2", "--new-tokens", "2", "--prompt", "3",
                   "--prefill", "8", "--json", "--out", str(out)])
    assert bench_speed.run(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads(out.read_text())
    base, q = res["rows"]
    assert base["plan"] == "base" and base["bits_per_weight"] == 16.0
    assert q["bits_per_weight"] == pytest.approx(4 + 20 / 32)  # 4-bit codes + fp16 scale + 4-bit zero per 32
    assert set(q["decode"]) == {"1", "2"} and q["decode"]["2"]["batch"] == 2
    assert q["kernels"] is None and q["peak_gib"] is None and q["prefill"]["tokens"] == 8
    md = bench_speed.table(res["rows"], (1, 2))
    assert md.count("\n") == 3 and "(1.00x)" in md.splitlines()[2]
