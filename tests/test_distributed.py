"""Trials and per-layer work on Ray actors: the same study (CLI, --workers 1 and 2) as one process,
a killed worker's trial run again (none lost, none twice), a stopped study resumed, measured KL
split by layer (CLI) as in one process; Ax and Optuna proposing several trials at once."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mixq.cli import main
from mixq.cluster import Cluster, ModelSpec
from mixq.errors import MixqError
from mixq.models import load_model
from mixq.search import SearchConfig, SearchSpace, Start
from mixq.search.cache import WeightCache
from mixq.search.objective import best_trial

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'mixq[ray]')")
CHOICES = ("int2-g32", "int3-g32", "int4-g32", "int8")
META = {"model_sha256": "x", "seqlen": 32, "limit": 4}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (it takes seconds to start)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's cache factory goes to the workers
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir).model


@pytest.fixture
def score():
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _study(tiny_dir, tiny, score, run_dir, *, workers, trials, cache_factory=WeightCache.for_space, **kw):
    from mixq.search.distributed import run_distributed_search

    space = SearchSpace(choices=CHOICES, granularity="layer")
    units = space.units(tiny)
    starts = [Start(f"uniform {c}", {u.name: c for u in units}) for c in space.choices]
    config = SearchConfig(backend="random", trials=trials, max_bits=4.0, seed=3)
    return run_distributed_search(tiny, space, score, config, run_dir, spec=ModelSpec(str(tiny_dir), "float32", "cpu"),
                                  cluster=Cluster(workers=workers), meta=META, initial=starts, progress=False,
                                  cache_factory=cache_factory, **kw)


def _ids(trials):
    return sorted(t["trial_id"] for t in trials)


def _search_argv(tiny_dir, data_dir, run_dir, *extra):
    space = run_dir.parent / "space.yaml"
    space.write_text(json.dumps({"granularity": "layer", "choices": list(CHOICES)}))
    return ["search", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--max-bits", "4.0", "--backend", "random",
            "--space", str(space), "--trials", "10", "--run-dir", str(run_dir), "--seqlen", "32", "--limit", "2",
            "--final-limit", "2", "--device", "cpu", "--json", *extra]


@needs_ray
def test_two_workers_run_the_study_of_one(local_ray, tiny_dir, data_dir, tmp_path):
    runs = {}
    for name, extra in (("single", ()), ("one", ("--workers", "1")), ("two", ("--workers", "2"))):
        assert main(_search_argv(tiny_dir, data_dir, tmp_path / name, *extra)) == 0
        runs[name] = [json.loads(x) for x in (tmp_path / name / "trials.jsonl").read_text().splitlines()]
    for name in ("one", "two"):
        assert [t["number"] for t in runs[name]] == list(range(10)) and _ids(runs[name]) == list(range(10))
    assert len({t["worker"]["pid"] for t in runs["two"]}) == 2  # both workers scored trials
    assert len({t["worker"]["pid"] for t in runs["one"]}) == 1
    # a deterministic backend: the same proposals in the order sent, the same scores, the same best plan
    sent = {k: sorted(v, key=lambda t: t.get("trial_id", t["number"])) for k, v in runs.items()}
    for name in ("one", "two"):
        assert [t["assignment"] for t in sent[name]] == [t["assignment"] for t in sent["single"]]
        assert [t["ppl"] for t in sent[name]] == pytest.approx([t["ppl"] for t in sent["single"]], rel=1e-5)
        assert (tmp_path / name / "best_plan.yaml").read_text() == (tmp_path / "single" / "best_plan.yaml").read_text()
    assert best_trial(runs["two"])["assignment"] == best_trial(runs["one"])["assignment"]


HOLD_SECONDS = 0.3  # each trial of the kill test lasts this long, so one is always in flight


@dataclass(frozen=True)
class MarkedCache:
    """A weight cache whose swap marks the worker busy (``<pid>.busy`` in ``marks``) for HOLD_SECONDS."""

    marks: Path

    def __call__(self, model, space, units):
        cache = WeightCache.for_space(model, space, units)
        apply, marks = cache.apply, self.marks

        def held(units, assignment):
            mark = marks / f"{os.getpid()}.busy"
            mark.touch()
            time.sleep(HOLD_SECONDS)
            mark.unlink()
            apply(units, assignment)

        cache.apply = held
        return cache


class Stop(Exception):
    pass


@needs_ray
def test_killed_worker_loses_no_trial_and_a_stopped_study_resumes(local_ray, tiny_dir, tiny, score, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    killed: list[tuple[int, int]] = []  # (pid, the number of the record after which it was killed)
    seen: set[int] = set()

    def kill_then_stop(record):
        pid = record["worker"]["pid"]
        if killed and pid not in seen:  # the restarted worker's first trial: the killed one, run again
            raise Stop
        seen.add(pid)
        if killed or record["number"] < 3:
            return
        for _ in range(50):  # SIGKILL the other worker, mid-trial (else try again at the next record)
            busy = [int(p.stem) for p in marks.glob("*.busy") if int(p.stem) != pid]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append((busy[0], record["number"]))
                return
            time.sleep(0.01)

    run_dir, factory = tmp_path / "k", MarkedCache(marks)
    with pytest.raises(Stop):  # many trials: the survivor cannot finish them before the killed worker is back
        _study(tiny_dir, tiny, score, run_dir, workers=2, trials=500, cache_factory=factory, on_trial=kill_then_stop)
    path = run_dir / "trials.jsonl"
    before = [json.loads(x) for x in path.read_text().splitlines()]
    n = len(before)
    assert [t["number"] for t in before] == list(range(n))
    pid, at = killed[0]
    assert len({t["worker"]["pid"] for t in before}) == 3  # both workers, then the killed one restarted
    assert pid not in [t["worker"]["pid"] for t in before[at + 1 :]]
    ids = [t["trial_id"] for t in before]
    assert len(set(ids)) == n and len(set(range(max(ids) + 1)) - set(ids)) <= 1  # at most the one in flight at the stop
    after = _study(tiny_dir, tiny, score, run_dir, workers=2, trials=n + 3, resume=True)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == after and lines[:n] == before
    assert [t["number"] for t in lines] == list(range(n + 3))
    ids = [t["trial_id"] for t in lines]
    assert len(set(ids)) == n + 3 and min(ids[n:]) > max(ids[:n])  # the resumed run's ids after the old ones
    assert not [t for t in lines[n:] if t["source"] == "initial"]  # the starts were done before the stop


@needs_ray
def test_measured_kl_split_by_layer(local_ray, tiny_dir, text_file, tmp_path):
    sens = {}
    for name, extra in (("single", ()), ("two", ("--workers", "2"))):
        out = tmp_path / f"{name}.json"
        assert main(["sensitivity", "--model", str(tiny_dir), "--method", "measured", "--formats", "int4-g32,int2-g32",
                     "--calib-dataset", str(text_file), "--nsamples", "4", "--seqlen", "32", "--out", str(out),
                     "--device", "cpu", "--json", *extra]) == 0
        sens[name] = json.loads(out.read_text())["layers"]
    assert list(sens["two"]) == list(sens["single"]) and len(sens["two"]) == 14  # 2 blocks x 7 Linear layers
    for n, d in sens["single"].items():
        assert sens["two"][n]["measured"] == pytest.approx(d["measured"], rel=1e-5)
        assert d["measured"]["int2-g32"] > d["measured"]["int4-g32"] > 0


def test_layer_groups_cover_the_layers_in_order():
    from mixq.sensitivity.distributed import layer_groups

    layers = [f"l{i}" for i in range(10)]
    groups = layer_groups(layers, 4)
    assert [len(g) for g in groups] == [3, 3, 2, 2] and sum(groups, []) == layers
    assert layer_groups(layers[:2], 8) == [["l0"], ["l1"]]


def test_workers_without_ray_says_how_to_install(monkeypatch, tmp_path):
    from mixq.commands import search

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    p = argparse.ArgumentParser()
    search.add_parser(p.add_subparsers())
    args = p.parse_args(["search", "--model", "missing", "--max-bits", "4", "--run-dir", str(tmp_path), "--workers", "2",
                         "--device", "cpu"])
    with pytest.raises(MixqError, match=r"pip install 'mixq\[ray\]'"):
        search.run(args)
    with pytest.raises(MixqError, match="--workers must be positive"):
        Cluster(workers=0)


def test_ax_proposes_several_trials_while_others_are_pending():
    """After the Sobol trials, one ``get_next_trials(max_trials=3)`` gives three GP proposals within
    budget: the second and third are made while the first is pending (analytic LogEI takes no
    pending trials: without ``parallel`` they fail and fall back to random plans)."""
    from mixq.search.backends.ax import SOBOL_TRIALS, AxProposer
    from mixq.search.backends.base import Budget, Fallback

    units, choices = [f"b{i}" for i in range(4)], ["int2", "int3", "int4", "int8"]
    bits = {u: {c: 100 * int(c[3:]) for c in choices} for u in units}
    budget = Budget(bits, {u: 100 for u in units}, 4.0 * 400)
    ax = AxProposer(0, units, choices, [], budget, parallel=True)
    for k in range(SOBOL_TRIALS):  # known trials: the loss falls with the bits
        a = {u: choices[(k + i) % 3] for i, u in enumerate(units)}
        ax.add(a, (10.0 - sum(int(c[3:]) for c in a.values()) / 4,))
    batch = ax.ask_many(3)
    assert len(batch) == 3 and not any(isinstance(h, Fallback) for _, h in batch)
    assert all(budget.fits(a) for a, _ in batch)
    assert len({json.dumps(a, sort_keys=True) for a, _ in batch}) == 3  # three different plans


def test_optuna_ask_many_asks_n_times(tmp_path):
    from mixq.search.backends.optuna import OptunaProposer

    p = OptunaProposer("random", 0, ["a", "b"], ["int4", "int8"], f"sqlite:///{tmp_path / 's.db'}", False)
    got = p.ask_many(3)
    assert [h.number for _, h in got] == [0, 1, 2]
