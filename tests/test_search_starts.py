"""Search: the budget as Ax sees it, guided starts for every backend, the timing of the loop the cache replaces."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mixq.search import SearchConfig, SearchSpace, run_search
from mixq.search.backends.ax import AxProposer
from mixq.search.cache import WeightCache
from mixq.search.config import Start
from mixq.search.size import SizeModel
from mixq.search.starts import guided_starts
from mixq.search.timing import requantize_seconds
from mixq.plan import LayerSpec

CHOICES = ("int2-g32", "int3-g32", "int4-g32", "int8")


@pytest.fixture
def score():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _meta(space, max_bits=None, max_size=None):
    return {"model_sha256": "x", "space": space.to_dict(), "objective": "ppl", "max_bits": max_bits,
            "max_size": max_size, "seqlen": 24, "limit": 2}


def _sens(model, units):
    """A sensitivity file as ``mixq sensitivity --method measured`` writes it, with made-up KL:
    the first unit's layers are sensitive, the others hardly."""
    from mixq.sensitivity.analysis import geometry

    layers = [n for u in units for n in u.layers]
    geo = geometry(model, layers, list(CHOICES))
    for n in layers:
        weight = 100.0 if n in units[0].layers else 0.01
        geo[n]["measured"] = {f: weight * e for f, e in geo[n]["noise"].items()}
    return {"layers": geo, "methods_done": ["measured"], "other_bits": 0}


@pytest.mark.parametrize("max_bits,max_size", [(4.0, None), (None, 60_000), (3.7, 61_000)])
def test_budget_bound_is_the_size_check(model, max_bits, max_size):
    space = SearchSpace(choices=CHOICES, granularity="layer", fixed=(("re:.*down_proj", LayerSpec.of("int8")),))
    units = space.units(model)
    size = SizeModel(space, units, model)
    config = SearchConfig(max_bits=max_bits, max_size=max_size)
    budget = size.budget(config)
    rng = random.Random(0)
    for _ in range(200):
        a = {u.name: rng.choice(CHOICES) for u in units}
        assert budget.fits(a) == config.budget_ok(*size(a))


def test_ax_proposes_within_the_budget_from_ordered_choices(model, score, tmp_path):
    space = SearchSpace(choices=CHOICES, granularity="layer")
    config = SearchConfig(backend="ax", trials=10, max_bits=4.7, seed=0)
    units = space.units(model)
    budget = SizeModel(space, units, model).budget(config)
    proposer = AxProposer(0, [u.name for u in units], list(CHOICES), [], budget)
    ss = proposer.client._experiment.search_space
    assert len(ss.parameter_constraints) == 1
    values = [p.values for p in ss.parameters.values()]
    assert all(p.is_ordered for p in ss.parameters.values()) and all(v == sorted(v) for v in values)
    initial = [Start(f"uniform {c}", {u.name: c for u in units}) for c in CHOICES]
    for k in (1, 2):  # five starts or more: no Sobol trials
        initial.append(Start(f"mixed {k}", {u.name: CHOICES[(i + k) % 3] for i, u in enumerate(units)}))
    trials = run_search(model, space, score, config, tmp_path / "ax", meta=_meta(space, 4.7), initial=initial,
                        progress=False)
    n = sum(t["source"] == "initial" for t in trials)
    assert n >= 5 and [t["source"] for t in trials[n:]] == ["ax"] * (10 - n)  # every proposal fits: none repaired
    assert trials[-1]["rejected_so_far"] == 0 and all(t["bits_per_weight"] <= 4.7 for t in trials)


def test_ax_falls_back_to_categories_when_two_choices_cost_the_same(model):
    space = SearchSpace(choices=("int4-sym-g32", "nf4-g32", "int8"), granularity="block")  # 4.5 bits each
    units = space.units(model)
    budget = SizeModel(space, units, model).budget(SearchConfig(max_bits=5.0))
    proposer = AxProposer(0, [u.name for u in units], list(space.choices), [], budget)
    ss = proposer.client._experiment.search_space
    assert not ss.parameter_constraints and not any(p.is_ordered for p in ss.parameters.values())


@pytest.mark.parametrize("backend", ["tpe", "nsga2", "ax"])
def test_guided_starts_seed_every_backend(model, score, tmp_path, backend):
    space = SearchSpace(choices=CHOICES, granularity="layer")
    units = space.units(model)
    config = SearchConfig(backend=backend, trials=8, max_bits=4.0, seed=0)
    starts = guided_starts(_sens(model, units), space, units, SizeModel(space, units, model), config, count=2, seed=0)
    assert [s.label for s in starts] == ["guided: greedy on measured KL", "guided: greedy on measured KL, costs jittered (seed 1)"]
    first = starts[0].assignment
    assert first[units[0].name] == "int8"  # the sensitive unit gets the most bits, paid by the others
    initial = [Start(f"uniform {c}", {u.name: c for u in units}) for c in CHOICES] + starts
    trials = run_search(model, space, score, config, tmp_path / backend, meta=_meta(space, 4.0), initial=initial,
                        progress=False)
    labelled = {name: t for t in trials if "start" in t for name in t["start"].split(" = ")}  # coinciding starts share a trial
    assert labelled["guided: greedy on measured KL"]["assignment"] == first
    assert "uniform int8 (repaired to fit)" in labelled and "uniform int2-g32" in labelled
    assert all(t["bits_per_weight"] <= 4.0 for t in trials)
    if backend == "nsga2":  # the starts join NSGA-II's first generation
        import optuna

        study = optuna.load_study(study_name="mixq", storage=f"sqlite:///{tmp_path / backend / 'study.db'}")
        added = [t for t in study.trials if t.number < sum("start" in t for t in trials)]
        assert all(t.system_attrs.get("NSGAIISampler:generation") == 0 for t in added)


def test_coinciding_starts_share_one_trial(model, score, tmp_path):
    space = SearchSpace(choices=CHOICES, granularity="block")
    units = space.units(model)
    a = {u.name: "int3-g32" for u in units}
    initial = [Start("uniform int3-g32", a), Start("plan p.yaml", dict(a))]
    trials = run_search(model, space, score, SearchConfig(trials=1, max_bits=4.0), tmp_path / "s", meta=_meta(space, 4.0),
                        initial=initial, progress=False)
    assert trials[0]["start"] == "uniform int3-g32 = plan p.yaml"


def test_requantize_loop_and_pinned_layers(model, score):
    space = SearchSpace(choices=CHOICES, granularity="block", fixed=(("re:.*down_proj", LayerSpec.of("int2-g32")),))
    units = space.units(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seconds = requantize_seconds(model, space, units, [{u.name: "int4-g32" for u in units}], score, batch_size=2)
    assert len(seconds) == 1 and seconds[0] > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights put back
    cache = WeightCache.for_space(model, space, units)
    assert set(cache.pinned) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    cache.apply(units, {u.name: "int8" for u in units})
    down = model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert not torch.equal(down, before["model.layers.0.mlp.down_proj.weight"])  # the fixed layer is quantized in trials
    cache.restore()
    assert torch.equal(down, before["model.layers.0.mlp.down_proj.weight"])


def test_search_cli_names_the_starts_and_times_the_requantize_loop(tiny_dir, data_dir, text_file, tmp_path):
    from mixq.cli import main

    sens = tmp_path / "sens.json"
    assert main(["sensitivity", "--model", str(tiny_dir), "--method", "measured", "--formats", ",".join(CHOICES),
                 "--calib-dataset", str(text_file), "--nsamples", "2", "--seqlen", "24", "--out", str(sens),
                 "--device", "cpu", "--json"]) == 0
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"granularity": "block", "choices": list(CHOICES)}))
    run_dir = tmp_path / "run"
    assert main(["search", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--max-bits", "4.5", "--backend", "ax",
                 "--space", str(space), "--trials", "8", "--run-dir", str(run_dir), "--seqlen", "32", "--limit", "2",
                 "--final-limit", "2", "--device", "cpu", "--json", "--sens", str(sens), "--starts", "2"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert "start: guided: greedy on measured KL" in labels and labels[-1] == "best searched plan"
    assert "database" not in report and not (run_dir / "db").exists()  # RTN choices: no layer database
    assert any("guided: greedy on measured KL" in s["label"] for s in report["starts"])
    req = report["requantize"]
    assert req["trials"] >= 1 and len(req["requantize_seconds"]) == len(req["cached_seconds"]) == req["trials"]
    md = (run_dir / "report.md").read_text()
    assert "Starts (evaluated before" in md and "reloads the full-precision weights" in md
    # the bench summary reads the same files (bench/search_gpu.sh copies them under these names)
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(run_dir / "report.json", runs / "ax_block_report.json")
    shutil.copy(run_dir / "trials.jsonl", runs / "ax_block_trials.jsonl")
    shutil.copy(sens, runs / "sens_measured.json")
    script = Path(__file__).resolve().parents[1] / "bench" / "summarize_search.py"
    subprocess.run([sys.executable, str(script), "--runs", str(runs), "--out", str(tmp_path)], check=True)
    summary = (tmp_path / "search_h100.md").read_text()
    assert "| ax_block (ax) | block | ≤ 4.5 bits/weight |" in summary and "reload-and-requantize loop" in summary
    assert (tmp_path / "search_best_vs_trial.png").stat().st_size > 1000


def test_a_failed_ax_proposal_becomes_a_random_trial(model, score, tmp_path, monkeypatch, capsys):
    from ax.api.client import Client

    def broken(self, max_trials=1):
        raise RuntimeError("no candidate")

    monkeypatch.setattr(Client, "get_next_trials", broken)
    space = SearchSpace(choices=CHOICES, granularity="block")
    trials = run_search(model, space, score, SearchConfig(backend="ax", trials=3, max_bits=4.0), tmp_path / "f",
                        meta=_meta(space, 4.0), progress=False)
    assert [t["source"] in ("random", "repaired") for t in trials] == [True] * 3
    assert all(t["bits_per_weight"] <= 4.0 for t in trials)
    assert "Ax could not propose (RuntimeError: no candidate)" in capsys.readouterr().err


def test_neighbours_of_the_trials_meet_the_budget():
    from mixq.search.backends.ax import neighbours

    levels = [torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)] * 3
    budget = [(torch.tensor([0, 1, 2]), torch.tensor([-1.0, -1.0, -1.0]), -9.0)]  # x0 + x1 + x2 <= 9
    X = torch.tensor([[3.0, 3.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    C = neighbours(X, levels, budget, random_points=0)
    assert len(C) and (C.sum(-1) <= 9).all()
    assert not any(torch.equal(c, x) for c in C for x in X)
    assert any(torch.equal(c, torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64)) for c in C)  # one up, one down
    assert len(torch.unique(C, dim=0)) == len(C)
