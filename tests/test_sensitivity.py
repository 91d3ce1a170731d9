"""Trace estimators against exact values."""

from __future__ import annotations

import math

import pytest
import torch

from mixq.sensitivity import fisher_trace, hutchinson_trace, shifted_nll


def test_shifted_loss_equals_model_loss(model):
    batch = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(shifted_nll(model, batch)) == pytest.approx(float(model(batch, labels=batch).loss), rel=1e-6)


def test_hutchinson_converges_to_the_exact_trace():
    torch.manual_seed(0)
    a = torch.randn(12, 12)
    h1 = a @ a.T + torch.eye(12)  # known Hessians of a quadratic loss
    h2 = torch.diag(torch.arange(1.0, 9.0))
    p1 = torch.zeros(12, requires_grad=True)
    p2 = torch.zeros(8, requires_grad=True)

    def loss(_sample):
        return 0.5 * (p1 @ h1 @ p1) + 0.5 * (p2 @ h2 @ p2) + (p1[:8] * p2).sum()  # a coupling block

    for per_layer in (False, True):
        est = hutchinson_trace(loss, {"a": p1, "b": p2}, [None], max_iter=3000, tol=0.0, per_layer=per_layer)
        assert est["a"].trace == pytest.approx(float(torch.trace(h1)), rel=0.05)
        assert est["b"].trace == pytest.approx(36.0, rel=0.05)
        assert est["a"].stderr < 0.05 * est["a"].trace
    stopped = hutchinson_trace(loss, {"b": p2}, [None], max_iter=1000, tol=0.05)
    # alone, "b" has a diagonal Hessian: every Rademacher probe gives its trace exactly, so the estimate
    # stops at the fewest probes (min_iter = 5) with no spread
    assert (stopped["b"].trace, stopped["b"].stderr, stopped["b"].iterations) == (36.0, 0.0, 5)
    for per_layer in (False, True):  # a time budget of zero still takes the two probes a standard error needs
        timed = hutchinson_trace(loss, {"a": p1, "b": p2}, [None], max_iter=1000, tol=0.0, per_layer=per_layer,
                                 max_seconds=0.0)
        assert [e.iterations for e in timed.values()] == [2, 2] and all(e.stderr < math.inf for e in timed.values())


def test_hutchinson_with_a_few_samples_per_probe_is_unbiased():
    """Per-sample Hessians differ; probes over cycling subsets still estimate tr(mean H)."""
    torch.manual_seed(1)
    hs = [torch.diag(torch.rand(10) * 4 * (i + 1)) for i in range(4)]
    p = torch.zeros(10, requires_grad=True)
    exact = float(sum(torch.trace(h) for h in hs) / len(hs))
    est = hutchinson_trace(lambda i: 0.5 * (p @ hs[i] @ p), {"p": p}, list(range(4)), max_iter=2000, tol=0.0,
                           samples_per_probe=1)
    assert est["p"].iterations == 2000
    assert est["p"].trace == pytest.approx(exact, rel=0.05) and est["p"].stderr < 0.05 * exact


def test_fisher_trace_of_a_linear_gaussian_model():
    """y = w·x + ε, loss ½(y − w·x)²: the gradient is −ε x, so tr F = E[ε²] E[‖x‖²] = s² d."""
    torch.manual_seed(0)
    d, s, n = 6, 0.5, 20000
    w_true = torch.randn(d)
    xs = torch.randn(n, d)
    ys = xs @ w_true + s * torch.randn(n)
    w = w_true.clone().requires_grad_(True)
    est = fisher_trace(lambda i: 0.5 * (ys[i] - xs[i] @ w) ** 2, {"w": w}, range(n))
    assert est["w"].trace == pytest.approx(s * s * d, rel=0.05)
    assert est["w"].per_param == pytest.approx(s * s, rel=0.05)


def _fit_and_kl_by_hand(tiny_dir, text_file, name, formats, *, nsamples, seqlen):  # type: ignore[no-untyped-def]
    """One layer's FIT and measured KL from their definitions, with transformers' own loss: the
    calibration windows drawn as GPTQ does; the empirical Fisher trace is the mean over windows of
    ‖∂loss/∂W‖²; FIT = trace / #W × ‖Q(W) − W‖²; the measured KL is the mean over every position of
    KL(p_base ‖ p) with only that layer quantized."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixq.formats import parse_format

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(text_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    rng = random.Random(0)
    win = torch.stack([ids[s : s + seqlen] for s in (rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples))])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    w = model.get_submodule(name).weight
    grads = [torch.autograd.grad(model(x[None], labels=x[None]).loss, w)[0] for x in win]
    trace = float(sum(g.double().pow(2).sum() for g in grads) / len(grads))
    original = w.detach().clone()
    score, kl = {}, {}
    with torch.no_grad():
        p = torch.log_softmax(model(win).logits.double(), -1)
        for f in formats:
            q_w = parse_format(f).fake_quantize(original)
            score[f] = trace / w.numel() * float((q_w - original).pow(2).sum())
            w.copy_(q_w)
            q = torch.log_softmax(model(win).logits.double(), -1)
            kl[f] = float((p.exp() * (p - q)).sum() / win.numel())
            w.copy_(original)
    return {"trace": trace, "score": score}, kl


def test_sensitivity_and_allocate_cli(capsys, tiny_dir, text_file, tmp_path):
    import json

    from mixq.cli import main
    from mixq.plan import Plan

    out = tmp_path / "sens.json"
    argv = ["sensitivity", "--model", str(tiny_dir), "--method", "fit,measured,hessian", "--formats", "int4-g32,int2-g32",
            "--calib-dataset", str(text_file), "--nsamples", "3", "--seqlen", "24", "--out", str(out), "--max-iter", "4",
            "--device", "cpu", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sens = json.loads(out.read_text())
    assert printed["methods"] == ["fit", "measured", "hessian"] and set(printed["spearman"]) == {
        "fit~measured", "fit~hessian", "measured~hessian"}
    name = "model.layers.0.mlp.down_proj"
    layer = sens["layers"][name]
    assert layer["params"] == 64 * 96 and layer["bits"]["int4-g32"] == 64 * 96 * 4 + 64 * 3 * 20
    fit, kl = _fit_and_kl_by_hand(tiny_dir, text_file, name, ("int4-g32", "int2-g32"), nsamples=3, seqlen=24)
    assert layer["fit"]["trace"] == pytest.approx(fit["trace"], rel=1e-4)
    for f in ("int4-g32", "int2-g32"):
        assert layer["fit"]["score"][f] == pytest.approx(fit["score"][f], rel=1e-4)
        assert layer["measured"][f] == pytest.approx(kl[f], rel=1e-4)
    assert layer["measured"]["int2-g32"] > layer["measured"]["int4-g32"] > 0
    assert out.with_suffix(".csv").is_file() and out.with_suffix(".png").is_file()
    assert main(argv) == 0  # resumed: every method already done
    assert "already done" in capsys.readouterr().err
    other = text_file.with_name("other.txt")
    other.write_text(text_file.read_text()[::-1])
    changed = [other if a == str(text_file) else a for a in argv]
    assert main([str(a) for a in changed]) == 0  # another calibration text: scored anew, never resumed
    assert "already done" not in capsys.readouterr().err
    assert json.loads(out.read_text())["meta"]["calibration"]["dataset"] == str(other)
    assert main([*argv[:-1], "--max-iter", "3", "--json"]) == 0  # another Hessian setting: anew too
    assert "already done" not in capsys.readouterr().err

    plan_path = tmp_path / "plan.yaml"
    assert main(["allocate", "--sens", str(out), "--max-bits", "3.2", "--out", str(plan_path), "--starts", "2"]) == 0
    plan = Plan.load(plan_path)
    assert {s.format.name for _, s in plan.rules} == {"int4-g32", "int2-g32"}  # mixed, not uniform
    from conftest import tiny_llama

    assert plan.bits(tiny_llama()) <= 3.2 and (tmp_path / "plan-1.yaml").is_file()
    assert main(["allocate", "--sens", str(out), "--max-bits", "2.0", "--out", str(plan_path)]) == 2
    assert "infeasible budget" in capsys.readouterr().err
    assert main(["allocate", "--sens", str(out), "--max-bits", "17", "--out", str(plan_path)]) == 2
    assert main([*argv[:4], "curvature", *argv[5:]]) == 2
    assert "unknown sensitivity method curvature" in capsys.readouterr().err
