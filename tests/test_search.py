"""Search: every backend respects the budget, studies resume after a kill, spaces round-trip."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mixq.cli import main
from mixq.errors import MixqError, PlanError
from mixq.search import SearchConfig, SearchSpace, run_search
from mixq.plan import LayerSpec
from mixq.search.size import SizeModel, repair

CHOICES = ("int2-g32", "int3-g32", "int4-g32", "int8")


@pytest.fixture
def score():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _meta(space):
    return {"model_sha256": "x", "space": space.to_dict(), "objective": "ppl", "max_bits": 4.0, "max_size": None,
            "seqlen": 24, "limit": 2}


def test_space_round_trip(tmp_path):
    space = SearchSpace.from_dict({"granularity": "layer", "choices": list(CHOICES), "solver": "rtn",
                                   "fixed": [{"match": "re:.*down_proj", "format": "int8"}], "include": []})
    assert SearchSpace.from_dict(space.to_dict()) == space
    (tmp_path / "s.yaml").write_text(json.dumps(space.to_dict()))
    assert SearchSpace.load(tmp_path / "s.yaml") == space


@pytest.mark.parametrize("granularity,count", [("layer", 2 * 4), ("block", 2), ("shared", 4), ("model", 1)])
def test_units_and_tied_layers(model, granularity, count):
    space = SearchSpace(choices=CHOICES, granularity=granularity, fixed=())
    units = space.units(model)
    assert len(units) == count
    for u in units:  # q/k/v and gate/up never split across units
        for tied in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            blocks = {n.rsplit(".", 1)[0] for n in u.layers if n.rsplit(".", 1)[-1] in tied}
            for b in blocks:
                assert all(f"{b}.{t}" in u.layers for t in tied)


def _recording(real, asked):  # type: ignore[no-untyped-def]
    """``make_proposer`` whose proposers also note every assignment they propose."""

    def make(name, context):  # type: ignore[no-untyped-def]
        proposer = real(name, context)

        class Recorded:
            def ask(self):  # type: ignore[no-untyped-def]
                assignment, handle = proposer.ask()
                asked.append(dict(assignment))
                return assignment, handle

            def tell(self, handle, values):  # type: ignore[no-untyped-def]
                proposer.tell(handle, values)

            def reject(self, handle):  # type: ignore[no-untyped-def]
                proposer.reject(handle)

            def add(self, assignment, values):  # type: ignore[no-untyped-def]
                proposer.add(assignment, values)

        return Recorded()

    return make


@pytest.mark.parametrize("backend", ["random", "tpe", "nsga2", "nsga3", "qmc", "gp", "evo", "ax"])
def test_every_backend_respects_the_budget(model, score, tmp_path, backend, monkeypatch):
    """The loop repairs what does not fit, so the trials alone cannot tell a backend that ignores the
    budget from one that keeps it: the proposals themselves are checked, and the repair count."""
    from mixq.search import loop
    from mixq.search.backends.ax import SOBOL_TRIALS

    asked: list[dict[str, str]] = []
    monkeypatch.setattr(loop, "make_proposer", _recording(loop.make_proposer, asked))
    space = SearchSpace(choices=CHOICES, granularity="layer")
    config = SearchConfig(backend=backend, trials=6, max_bits=4.0, seed=1)
    trials = run_search(model, space, score, config, tmp_path / backend, meta=_meta(space), progress=False)
    units = space.units(model)
    size = SizeModel(space, units, model)
    fits = lambda a: config.budget_ok(*size(a))  # noqa: E731
    assert len(trials) == len(asked) == 6  # no starts: one proposal per trial, a rejected one not counted
    for a in asked:  # each proposal assigns every unit one of the space's choices
        assert set(a) == {u.name for u in units} and set(a.values()) <= set(CHOICES)
    for i, (a, t) in enumerate(zip(asked, trials)):  # a fitting proposal is scored as proposed, another repaired
        if fits(a):
            assert t["assignment"] == a and t["source"] in (backend, "random")
        else:
            assert t["source"] == "repaired" and t["assignment"] == repair(space, units, a, fits)
        assert t["rejected_so_far"] == sum(not fits(b) for b in asked[: i + 1])
    assert all(t["bits_per_weight"] <= 4.0 for t in trials)
    # the backends that know the budget keep it: evo's mutations of a finished trial (all but its
    # first proposal) and Ax's GP proposals under the linear size constraint (after its Sobol trials)
    aware = {"evo": asked[1:], "ax": asked[SOBOL_TRIALS:]}.get(backend, [])
    assert all(fits(a) for a in aware)
    if backend not in ("evo", "ax"):  # the samplers explore: not one proposal over and over
        assert len({json.dumps(a, sort_keys=True) for a in asked}) > 1
    for t in trials:
        for tied in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):  # tied layers share a spec
            for b in range(2):
                fmts = {r["format"] for r in t["plan"]["rules"] if r["match"].rsplit(".", 1)[-1] in tied
                        and r["match"].startswith(f"model.layers.{b}.")}
                assert len(fmts) == 1
    lines = (tmp_path / backend / "trials.jsonl").read_text().splitlines()
    assert [json.loads(x)["number"] for x in lines] == list(range(6))


def test_size_model_is_exact(model):
    import random

    space = SearchSpace(choices=CHOICES, granularity="layer", fixed=(("re:.*down_proj", LayerSpec.of("int8")),))
    units = space.units(model)
    size = SizeModel(space, units, model)
    rng = random.Random(0)
    for _ in range(10):
        a = {u.name: rng.choice(CHOICES) for u in units}
        rep = space.plan(units, a).size_report(model)
        assert size(a) == (rep.bits_per_weight, rep.size_bytes)


def test_repair_fits_then_fills_and_infeasible_budget(model, score, tmp_path):
    space = SearchSpace(choices=CHOICES, granularity="block")
    units = space.units(model)
    a = repair(space, units, {u.name: "int8" for u in units}, lambda x: "int8" not in x.values())
    assert set(a.values()) == {"int4-g32"}  # stepped down from int8, then as high as the budget allows
    b = repair(space, units, {u.name: "int2-g32" for u in units}, lambda x: list(x.values()).count("int8") <= 1)
    assert sorted(b.values()) == ["int4-g32", "int8"]
    with pytest.raises(PlanError, match="above --max-bits 2.0"):
        run_search(model, space, score, SearchConfig(trials=2, max_bits=2.0), tmp_path / "x", meta=_meta(space), progress=False)


def test_resume_refuses_another_space(model, score, tmp_path):
    space = SearchSpace(choices=CHOICES, granularity="block")
    run_search(model, space, score, SearchConfig(trials=2, max_bits=4.0), tmp_path / "r", meta=_meta(space), progress=False)
    with pytest.raises(MixqError, match="already holds a study"):
        run_search(model, space, score, SearchConfig(trials=3, max_bits=4.0), tmp_path / "r", meta=_meta(space), progress=False)
    other = SearchSpace(choices=CHOICES[:3], granularity="block")
    with pytest.raises(MixqError, match="another space"):
        run_search(model, other, score, SearchConfig(trials=3, max_bits=4.0), tmp_path / "r", meta=_meta(other),
                   resume=True, progress=False)
    more = run_search(model, space, score, SearchConfig(trials=4, max_bits=4.0), tmp_path / "r", meta=_meta(space),
                      resume=True, progress=False)
    assert [t["number"] for t in more] == [0, 1, 2, 3]


def _search_argv(tiny_dir, data_dir, run_dir, trials):
    space = run_dir.parent / "space.yaml"
    space.write_text(json.dumps({"granularity": "layer", "choices": list(CHOICES)}))
    return ["search", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--max-bits", "4.5", "--backend", "tpe",
            "--space", str(space),
            "--trials", str(trials), "--run-dir", str(run_dir), "--seqlen", "32", "--limit", "2", "--final-limit", "2",
            "--device", "cpu", "--json"]


def test_killed_search_resumes(tiny_dir, wikitext_root, tmp_path):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixq.cli", *_search_argv(tiny_dir, wikitext_root, run_dir, 100000)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    trials = run_dir / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not trials.exists() or len(trials.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(x) for x in trials.read_text().splitlines() if x.strip().endswith("}")]
    assert len(before) >= 3
    total = len(before) + 4
    code = main(_search_argv(tiny_dir, wikitext_root, run_dir, total) + ["--resume"])
    assert code == 0
    after = [json.loads(x) for x in trials.read_text().splitlines() if x.strip()]
    assert [t["number"] for t in after] == list(range(total))  # all trials of both parts, none duplicated
    assert after[: len(before)] == before
    assert all(t["bits_per_weight"] <= 4.5 for t in after)
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["label"] for r in report["rows"]][-1] == "best searched plan"
    assert (run_dir / "pareto.png").stat().st_size > 1000 and (run_dir / "bits.png").is_file()


def test_search_cli_errors(capsys, tiny_dir, wikitext_root, tmp_path):
    argv = _search_argv(tiny_dir, wikitext_root, tmp_path / "e", 3)
    assert main([*argv[:-1], "--backend", "magic"]) == 2
    assert "unknown backend 'magic'" in capsys.readouterr().err
    i = argv.index("--max-bits")
    assert main(argv[:i] + ["--max-bits", "1.5"] + argv[i + 2 :]) == 2
    assert "infeasible budget" in capsys.readouterr().err
    assert main(argv[:i] + argv[i + 2 :]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_guided_and_user_starts(capsys, tiny_dir, wikitext_root, text_file, tmp_path):
    sens = tmp_path / "sens.json"
    assert main(["sensitivity", "--model", str(tiny_dir), "--method", "fit", "--formats", ",".join(CHOICES),
                 "--calib-dataset", str(text_file), "--nsamples", "2", "--seqlen", "24", "--out", str(sens),
                 "--device", "cpu", "--json"]) == 0
    plan = tmp_path / "user.yaml"
    plan.write_text("default: int3-g32\n")
    run_dir = tmp_path / "guided"
    argv = _search_argv(tiny_dir, wikitext_root, run_dir, 9) + ["--sens", str(sens), "--starts", "2", "--initial", str(plan)]
    assert main(argv) == 0
    trials = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    initial = [t for t in trials if t["source"] == "initial"]
    # the uniform plans (repaired to fit), the user plan, the guided starts: each distinct plan once
    assert len(initial) >= 3
    assert len({json.dumps(t["assignment"], sort_keys=True) for t in initial}) == len(initial)
    assert any(set(t["assignment"].values()) == {"int3-g32"} for t in initial)
    assert any(len(set(t["assignment"].values())) > 1 for t in initial)  # a mixed, sensitivity-guided start
    assert all(t["bits_per_weight"] <= 4.5 for t in trials)
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: nf4-g32\n")
    assert main(_search_argv(tiny_dir, wikitext_root, tmp_path / "bad", 3) + ["--initial", str(bad)]) == 2
    assert "not a choice of the space" in capsys.readouterr().err


def test_ax_study_resumes_from_its_jsonl(model, score, tmp_path):
    space = SearchSpace(choices=CHOICES, granularity="block")
    first = run_search(model, space, score, SearchConfig(backend="ax", trials=5, max_bits=4.0), tmp_path / "ax",
                       meta=_meta(space), progress=False)
    assert any(t["source"] in ("ax", "repaired") for t in first)
    more = run_search(model, space, score, SearchConfig(backend="ax", trials=7, max_bits=4.0), tmp_path / "ax",
                      meta=_meta(space), resume=True, progress=False)
    assert [t["number"] for t in more] == list(range(7)) and more[:5] == first
    assert all(t["bits_per_weight"] <= 4.0 for t in more)


def test_pareto_front_search(model, score, tmp_path):
    from mixq.search.objective import pareto_front

    space = SearchSpace(choices=CHOICES, granularity="block")
    trials = run_search(model, space, score, SearchConfig(backend="nsga2", trials=8, objective="pareto"), tmp_path / "p",
                        meta=_meta(space), progress=False)
    front = pareto_front(trials)
    assert front and all(a["size_bytes"] < b["size_bytes"] and a["ppl"] > b["ppl"] for a, b in zip(front, front[1:]))
    for t in trials:  # nothing on the front is beaten on both objectives
        assert not any(t["ppl"] < f["ppl"] and t["size_bytes"] <= f["size_bytes"] for f in front)
    with pytest.raises(MixqError, match="Pareto front needs one of"):
        run_search(model, space, score, SearchConfig(backend="ax", trials=2, objective="pareto"), tmp_path / "q",
                   meta=_meta(space), progress=False)


def test_pareto_cli_without_budget(capsys, tiny_dir, wikitext_root, tmp_path):
    argv = _search_argv(tiny_dir, wikitext_root, tmp_path / "front", 6)
    i = argv.index("--max-bits")
    argv = argv[:i] + argv[i + 2 :] + ["--objective", "pareto", "--backend", "nsga2"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "front" / "report.json").read_text())
    assert any(r["label"].startswith("front:") for r in report["rows"])
    assert json.loads((tmp_path / "front" / "pareto_front.json").read_text())


@pytest.mark.parametrize("text, message", [
    ("fixed: [{format: int8}]", "fixed[0] must be a mapping with 'match'"),
    ("tied: null", "'tied' must be a list of lists of layer names"),
    ("tied: [q_proj]", "tied[0] must be a list of layer names"),
    ("choices: int4-g32", "'choices' must be a list of format names"),
    ("include: 're:.*q_proj'", "'include' must be a list of layer names"),
    ("granularity: [block]", "'granularity' must be a string"),
])
def test_space_yaml_is_validated(tmp_path, text, message):
    """Each of these once raised a KeyError/TypeError or was read one character at a time."""
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(PlanError, match=re.escape(message)):
        SearchSpace.load(path)


def _latency_table(tiny_dir, path):
    """A latency table for the tiny model, fabricated as a GPU's would be measured: every Linear's 16-bit
    time, and each choice on every kernel that serves it at ``bits / 16`` of that (plus a fixed launch)."""
    from transformers import AutoModelForCausalLM

    from mixq.formats import parse_format
    from mixq.runtime.kernels import KERNELS
    from mixq.runtime.latency import BASE, LatencyTable, layer_key, linear_shapes, record_rest

    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(tiny_dir))
    table = LatencyTable("NVIDIA H200|torch 2.11.0")
    for shape in set(shapes.values()):
        base = 1e-6 * shape[0] * shape[1] / 1024
        table.layers[layer_key(shape, BASE, BASE, 1)] = base
        for name in CHOICES:
            fmt = parse_format(name)
            for kernel in KERNELS.values():
                if kernel.check(fmt, shape, torch.bfloat16) is None:
                    table.layers[layer_key(shape, name, kernel.name, 1)] = 2e-6 + base * fmt.code_bits / 16
    record_rest(table, shapes, model_key="tiny", batch=1, base_step_seconds=2e-3)
    table.save(path)
    return table


def test_throughput_objective_keeps_every_pick_under_the_perplexity_bound(tiny_dir, wikitext_root, tmp_path):
    """--objective throughput --max-ppl: each trial's predicted time is the table's sum, a trial is feasible
    exactly when its perplexity is within the bound, every feasible trial ranks above every infeasible one,
    and the best plan is the fastest feasible trial."""
    from mixq.plan import Plan
    from mixq.runtime.latency import LatencyModel, LatencyTable

    table_path = tmp_path / "latency.json"
    _latency_table(tiny_dir, table_path)

    def search(run_dir, max_ppl):
        argv = _search_argv(tiny_dir, wikitext_root, run_dir, 6)
        i = argv.index("--max-bits")
        argv = argv[:i] + argv[i + 2:] + ["--objective", "throughput", "--max-ppl", str(max_ppl),
                                          "--latency-table", str(table_path), "--latency-model", "tiny"]
        assert main(argv) == 0
        return [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines() if x.strip()]

    loose = search(tmp_path / "loose", 1e9)
    assert all(t["feasible"] for t in loose)
    bound = sorted(t["ppl"] for t in loose)[len(loose) // 2]
    trials = search(tmp_path / "tight", bound)
    assert {t["feasible"] for t in trials} == {True, False}
    assert len({round(t["predicted_s"], 12) for t in trials}) > 1  # int4 and int8 layers run on faster kernels
    for t in trials:
        assert t["feasible"] == (t["ppl"] <= bound)
        assert t["predicted_tokens_per_s"] == pytest.approx(1.0 / t["predicted_s"])
    worst_feasible = max(t["loss"] for t in trials if t["feasible"])
    assert worst_feasible < min(t["loss"] for t in trials if not t["feasible"])
    # the prediction of one trial, summed again from the table by hand
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lm = LatencyModel.for_model(LatencyTable.load(table_path), model.to(torch.bfloat16), model_key="tiny", batch=1)
    t0 = trials[0]
    plan = Plan.from_dict(t0["plan"])
    assert t0["predicted_s"] == pytest.approx(sum(lm.breakdown(plan).values()))
    report = json.loads((tmp_path / "tight" / "report.json").read_text())
    fastest = min((t for t in trials if t["feasible"]), key=lambda t: t["predicted_s"])
    assert report["latency"]["best_tokens_per_s"] == pytest.approx(1.0 / fastest["predicted_s"])
    assert report["latency"]["base_tokens_per_s"] == pytest.approx(1.0 / sum(lm.breakdown(Plan()).values()))
    base_row = next(r for r in report["rows"] if r["label"].startswith("base"))
    assert base_row["predicted_tokens_per_s"] == pytest.approx(report["latency"]["base_tokens_per_s"])
    assert report["infeasible"] == sum(not t["feasible"] for t in trials)
    md = (tmp_path / "tight" / "report.md").read_text()
    assert "decode tok/s (predicted)" in md and f"{report['infeasible']} trials were above it" in md
    # a bound relative to a uniform choice: measured on the scoring windows (those of the uniform start)
    rel = search(tmp_path / "relative", "int8+5%")
    int8 = next(t for t in rel if t["plan"]["default"] is None and {r["format"] for r in t["plan"]["rules"]} == {"int8"})
    meta = json.loads((tmp_path / "relative" / "config.json").read_text())
    assert meta["max_ppl_rule"]["ppl"] == pytest.approx(int8["ppl"], rel=1e-9)
    assert meta["max_ppl_rule"]["max_ppl"] == pytest.approx(1.05 * int8["ppl"], rel=1e-9)
    assert all(t["feasible"] == (t["ppl"] <= 1.05 * int8["ppl"] * (1 + 1e-12)) for t in rel)
    rel_report = json.loads((tmp_path / "relative" / "report.json").read_text())
    rule = rel_report["max_ppl_rule"]
    assert rule["rescore_max_ppl"] == pytest.approx(1.05 * rule["rescore_ppl"])
    assert rel_report["best"]["rescore_ppl"] <= rule["rescore_max_ppl"]  # uniform int8 itself is in the re-scored top
    with pytest.raises(MixqError, match=r"--max-ppl 'int8\+five': expected a perplexity"):
        from mixq.commands.search import relative_bound
        relative_bound("int8+five")


GGUF_AND_TORCHAO = ["int2-g32", "int3-g32", "int4-g32", "int8", "int4-sym-g32", "q4-k", "int8-sym-g32", "int4-fmin-g32"]


@pytest.mark.parametrize("target, kept", [
    ("torchao", {"int4-g32", "int4-sym-g32", "int4-fmin-g32", "int8"}),  # tinygemm (int4, groups 32..256), int8
    ("gguf", {"int4-sym-g32", "int8-sym-g32", "int4-fmin-g32"}),  # Q4_0, Q8_0, Q4_1; q4-k needs rows of 256
])
def test_a_target_keeps_the_choices_it_serves(target, kept):
    from conftest import tiny_llama
    from mixq.search.target import restrict

    model = tiny_llama()
    space = SearchSpace.from_dict({"granularity": "layer", "choices": GGUF_AND_TORCHAO, "target": target})
    units = space.units(model)
    restricted = restrict(space, model, units)
    assert {u.name: set(restricted.choices_of(u.name)) for u in units} == {u.name: kept for u in units}
    assert SearchSpace.from_dict(restricted.to_dict()) == restricted
    assert restrict(restricted, model, units).choices_of(units[0].name) == restricted.choices_of(units[0].name)


def test_a_target_that_serves_nothing_names_the_unit():
    from conftest import tiny_llama
    from mixq.search.target import restrict

    model = tiny_llama()
    space = SearchSpace.from_dict({"granularity": "layer", "choices": ["int2-g32", "int3-g32"], "target": "torchao"})
    with pytest.raises(PlanError, match=r"target torchao serves none of the choices \(int2-g32, int3-g32\) on unit "
                                        r"model\.layers\.0\.self_attn\.q_proj\+k_proj\+v_proj \(shapes 32x64, 64x64\)"):
        restrict(space, model, space.units(model))
    with pytest.raises(PlanError, match="target 'vllm' is not one of torchao, gemlite, gguf"):
        SearchSpace.from_dict({"choices": ["int8"], "target": "vllm"})


def test_search_on_a_target_proposes_only_what_it_serves(tiny_dir, wikitext_root, tmp_path):
    run_dir = tmp_path / "target"
    argv = _search_argv(tiny_dir, wikitext_root, run_dir, 5)
    i = argv.index("--max-bits")
    argv = argv[:i] + ["--max-bits", "8.5"] + argv[i + 2:]
    (tmp_path / "space.yaml").write_text(json.dumps({"granularity": "layer", "choices": list(CHOICES), "target": "torchao"}))
    assert main(argv) == 0
    trials = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines() if x.strip()]
    assert len(trials) == 5
    used = {r["format"] for t in trials for r in t["plan"]["rules"]}
    assert used and used <= {"int4-g32", "int8"}  # int2-g32 and int3-g32 have no torchao kernel
