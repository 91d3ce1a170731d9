"""Search on zero-shot accuracy: the objective itself, and perplexity under an accuracy bound."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from mixq.cli import main
from mixq.errors import MixqError
from mixq.evaluate.zeroshot import evaluate_tasks
from mixq.plan import Plan
from mixq.quantize import quantize_
from mixq.search import SearchConfig, SearchSpace, run_search
from mixq.search.objective import trial_loss, zero_shot_scorer
from mixq.search.config import Start

CHOICES = ("int2-g32", "int3-g32", "int4-g32", "int8")
TASKS = ("arc_easy", "piqa")
LIMIT = 8  # examples of each task per trial (the files hold 16)


def _mc(seed: int) -> list[dict]:
    """Sixteen four-way questions of random three-letter words (llm-foundry layout): the choices score
    close together, so quantization flips some answers and plans differ in accuracy."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghijklmnop") for _ in range(3))  # noqa: E731
    return [{"query": f"Q{i}: {word()} {word()}?", "choices": [word() for _ in range(4)], "gold": rng.randrange(4)}
            for i in range(16)]


@pytest.fixture
def zs_root(tmp_path):
    root = tmp_path / "data"
    (root / "zeroshot").mkdir(parents=True)
    for k, task in enumerate(TASKS):
        (root / "zeroshot" / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in _mc(k)) + "\n")
    return root


@pytest.fixture
def cli_root(zs_root, data_dir):
    """The tiny task files beside the shared WikiText-2 (the CLI reads both from one --data-dir)."""
    (zs_root / "wikitext2").symlink_to(data_dir / "wikitext2", target_is_directory=True)
    return zs_root


@pytest.fixture
def score():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _meta(space):
    return {"model_sha256": "x", "space": space.to_dict(), "max_bits": 4.0, "max_size": None, "seqlen": 24, "limit": 2}


def _scorer(root, limit=LIMIT):
    return zero_shot_scorer(byte_tokenizer(), TASKS, data_dir=root, limit=limit, batch_size=8, device="cpu", add_bos=False)


def _config(**kw):
    return SearchConfig(**{"backend": "tpe", "trials": 5, "max_bits": 4.0, "seed": 0, "tasks": TASKS, "task_limit": LIMIT,
                           **kw})


@pytest.mark.parametrize("backend", ["tpe", "ax"])
def test_acc_trials_score_the_fixed_subset(zs_root, score, tmp_path, backend):
    model, tok = tiny_llama(), byte_tokenizer()
    space = SearchSpace(choices=CHOICES, granularity="block")
    config = _config(objective="acc", backend=backend, trials=6 if backend == "ax" else 5)
    trials = run_search(model, space, score, config, tmp_path / "acc", meta=_meta(space), progress=False,
                        zero_shot=_scorer(zs_root))
    assert len(trials) == config.trials
    for t in trials:
        assert t["bits_per_weight"] <= 4.0 and 0.0 <= t["acc"] <= 1.0 and t["loss"] == 1.0 - t["acc"]
        assert set(t["tasks"]) == set(TASKS) and all(m["n"] == LIMIT for m in t["tasks"].values())
        assert t["acc"] == pytest.approx(sum(m["acc"] for m in t["tasks"].values()) / len(TASKS))
        assert math.isfinite(t["ppl"]) and "feasible" not in t  # perplexity is recorded alongside
    assert json.loads((tmp_path / "acc" / "config.json").read_text())["tasks"] == list(TASKS)
    # the same number from a plain evaluate_tasks call on the trial's plan applied to a fresh copy of the model
    t = trials[-1]
    q = copy.deepcopy(model)
    quantize_(q, Plan.from_dict(t["plan"]))
    direct = evaluate_tasks(q, tok, list(TASKS), data_dir=zs_root, limit=LIMIT)
    assert {k: m["acc"] for k, m in direct.items()} == {k: m["acc"] for k, m in t["tasks"].items()}
    assert t["acc"] == pytest.approx(sum(m["acc"] for m in direct.values()) / len(TASKS))


def test_acc_norm_is_the_metric_averaged(zs_root, score, tmp_path):
    model = tiny_llama()
    space = SearchSpace(choices=CHOICES, granularity="block")
    trials = run_search(model, space, score, _config(objective="acc", task_metric="acc_norm", trials=2), tmp_path / "n",
                        meta=_meta(space), progress=False, zero_shot=_scorer(zs_root))
    for t in trials:
        assert t["acc"] == pytest.approx(sum(m["acc_norm"] for m in t["tasks"].values()) / len(TASKS))


def test_loss_ranks_every_infeasible_trial_below_every_feasible_one():
    feasible = [trial_loss("ppl", p, 0.6, 0.5) for p in (1.0, 3.0, 50.0, 1e6, float("inf"))]
    infeasible = [trial_loss("ppl", p, a, 0.5) for p, a in ((1.0, 0.49), (2.0, 0.3), (1e6, 0.0))]
    assert all(ok for _, ok in feasible) and not any(ok for _, ok in infeasible)
    losses = [v for v, _ in feasible]
    assert losses == sorted(losses) and max(losses) <= 1.0 < min(v for v, _ in infeasible)  # in the order of ppl
    assert infeasible[0][0] < infeasible[1][0] < infeasible[2][0]  # a near miss ranks above a far one
    assert trial_loss("ppl", 7.0, 0.5, 0.5) == (math.log(7.0) / (1 + math.log(7.0)), True)  # the bound itself is met
    assert trial_loss("ppl", 7.0, None, None) == (7.0, True) and trial_loss("acc", 7.0, 0.25, None) == (0.75, True)


def test_min_acc_marks_trials_below_it_infeasible(zs_root, score, tmp_path):
    space = SearchSpace(choices=CHOICES, granularity="block")
    # accuracies recorded (not optimised) in a plain perplexity study pick a bound that splits the uniform starts
    units = space.units(tiny_llama())
    starts = [Start(f"uniform {c}", {u.name: c for u in units}) for c in CHOICES]
    free = run_search(tiny_llama(), space, score, _config(trials=4), tmp_path / "free", meta=_meta(space), progress=False,
                      zero_shot=_scorer(zs_root), initial=starts)
    accs = sorted({t["acc"] for t in free})
    assert len(accs) > 1, "the uniform plans should not all score alike"
    bound = (accs[0] + accs[-1]) / 2
    trials = run_search(tiny_llama(), space, score, _config(trials=7, min_acc=bound), tmp_path / "bound",
                        meta=_meta(space), progress=False, zero_shot=_scorer(zs_root), initial=starts)
    assert [t["acc"] for t in trials[:4]] == [t["acc"] for t in free]  # the same starts, the same scores
    for t in trials:
        assert t["feasible"] == (t["acc"] >= bound) and (t["loss"] < 1.0) == t["feasible"]
        assert t["bits_per_weight"] <= 4.0
    assert any(t["feasible"] for t in trials) and not all(t["feasible"] for t in trials)
    cfg = json.loads((tmp_path / "bound" / "config.json").read_text())
    assert cfg["objective"] == "ppl" and cfg["min_acc"] == bound
    with pytest.raises(MixqError, match="another min_acc"):
        run_search(tiny_llama(), space, score, _config(trials=8, min_acc=bound / 2), tmp_path / "bound",
                   meta=_meta(space), progress=False, zero_shot=_scorer(zs_root), resume=True)


def _argv(model_dir, root, run_dir, trials, *extra, task_limit=LIMIT):
    space = run_dir.parent / "space.yaml"
    space.write_text(json.dumps({"granularity": "block", "choices": list(CHOICES)}))
    return ["search", "--model", str(model_dir), "--data-dir", str(root), "--max-bits", "4.5", "--backend", "tpe",
            "--space", str(space), "--trials", str(trials), "--run-dir", str(run_dir), "--seqlen", "32", "--limit", "2",
            "--final-limit", "2", "--device", "cpu", "--json", "--tasks", ",".join(TASKS), "--task-limit", str(task_limit),
            "--final-task-limit", "12", *extra]


def test_acc_search_cli_resumes_and_reports_accuracy(tiny_dir, cli_root, tmp_path, capsys):
    run_dir = tmp_path / "acc"
    assert main(_argv(tiny_dir, cli_root, run_dir, 3, "--objective", "acc")) == 0
    first = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert main(_argv(tiny_dir, cli_root, run_dir, 5, "--objective", "acc", "--resume")) == 0
    trials = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert [t["number"] for t in trials] == list(range(5)) and trials[:3] == first
    assert all(t["bits_per_weight"] <= 4.5 and t["tasks"]["piqa"]["n"] == LIMIT for t in trials)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["objective"]["objective"] == "acc" and report["objective"]["final_task_limit"] == 12
    best = next(r for r in report["rows"] if r["label"] == "best searched plan")
    assert set(best["tasks"]) == set(TASKS) and all(m["n"] == 12 for m in best["tasks"].values())
    assert best["acc"] == pytest.approx(sum(m["acc"] for m in best["tasks"].values()) / 2) and math.isfinite(best["ppl"])
    assert all("acc" in r for r in report["rows"])
    assert report["best"]["rescore_tasks"]["piqa"]["n"] == 16  # re-scored on 4 x 8 examples: the whole file
    md = (run_dir / "report.md").read_text()
    assert "piqa acc (%)" in md and "Objective: the highest mean zero-shot acc" in md and "not held out" in md
    # a resumed study must score the same subset
    assert main(_argv(tiny_dir, cli_root, run_dir, 6, "--objective", "acc", "--resume", task_limit=5)) == 2
    assert "another task_limit" in capsys.readouterr().err


def test_min_acc_cli_reports_a_best_plan_meeting_the_bound(tiny_dir, cli_root, tmp_path):
    run_dir = tmp_path / "bound"
    bound = 0.25  # low enough that some plan meets it on this model; checked from the trials below
    assert main(_argv(tiny_dir, cli_root, run_dir, 5, "--min-acc", str(bound))) == 0
    trials = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert all(t["feasible"] == (t["acc"] >= bound) for t in trials)
    report = json.loads((run_dir / "report.json").read_text())
    best = report["best"]
    assert best["feasible"] and best["acc"] >= bound
    feasible_ppl = [t["ppl"] for t in trials if t["feasible"]]
    assert best["ppl"] in sorted(feasible_ppl)[:5]  # among the re-scored feasible trials
    assert report["infeasible"] == sum(not t["feasible"] for t in trials)
    assert "is at least 0.25" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--objective", "acc"], "--objective acc needs --tasks"),
    (["--min-acc", "0.5"], "--min-acc needs --tasks"),
    (["--tasks", "piqa", "--min-acc", "1.5"], r"--min-acc must be in \[0, 1\]"),
    (["--tasks", "piqa", "--min-acc", "-0.1"], r"--min-acc must be in \[0, 1\]"),
    (["--tasks", "piqa", "--objective", "acc", "--min-acc", "0.5"], "constrains a perplexity search"),
    (["--tasks", "copa", "--objective", "acc"], r"zeroshot/copa\.jsonl"),
    (["--tasks", "local_nope", "--objective", "acc"], "unknown local task"),
    (["--tasks", "piqa,piqa", "--objective", "acc"], "names a task twice"),
    (["--tasks", "wikitext2", "--objective", "acc"], "zero-shot tasks only"),
    (["--tasks", "piqa", "--objective", "acc", "--task-limit", "0"], "--task-limit must be positive"),
])
def test_bad_inputs_fail_before_the_model_loads(zs_root, tmp_path, capsys, extra, message):
    import re

    argv = ["search", "--model", "/nonexistent/model", "--data-dir", str(zs_root), "--max-bits", "4",
            "--run-dir", str(tmp_path / "r"), "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "model not found" not in err
    assert not (tmp_path / "r").exists()


def test_an_unknown_lm_eval_task_fails_before_the_model_loads(zs_root, tmp_path, capsys):
    argv = ["search", "--model", "/nonexistent/model", "--data-dir", str(zs_root), "--max-bits", "4", "--run-dir",
            str(tmp_path / "r"), "--device", "cpu", "--objective", "acc", "--tasks", "piqa,no_such_task_xyz"]
    assert main(argv) == 2
    assert "unknown task no_such_task_xyz" in capsys.readouterr().err


def test_a_task_without_the_metric_is_refused(zs_root, tmp_path, capsys):
    (zs_root / "zeroshot" / "lambada_openai.jsonl").write_text(json.dumps({"context": "a b", "continuation": "c"}) + "\n")
    argv = ["search", "--model", "/nonexistent/model", "--data-dir", str(zs_root), "--max-bits", "4", "--run-dir",
            str(tmp_path / "r"), "--device", "cpu", "--objective", "acc", "--tasks", "lambada_openai",
            "--task-metric", "acc_norm"]
    assert main(argv) == 2
    assert "reports no acc_norm" in capsys.readouterr().err
