"""The layer database: entries are the solver on the base model's Grams, builds resume, trials on it
are what ``quantize_`` with independent calibration gives, keys refuse other inputs."""

from __future__ import annotations

import dataclasses
import errno
import json

import pytest
import torch

from conftest import tiny_llama
from mixq.calibration import Gram
from mixq.data import tensor_sha256
from mixq.database import CalibrationSet, DatabaseError, DatabaseKey, LayerDatabase, build_database, entry_id
from mixq.database import store
from mixq.errors import MixqError
from mixq.evaluate import perplexity
from mixq.layers import read_weight, stored_bits
from mixq.plan import LayerSpec
from mixq.quantize import quantized_copy
from mixq.search import SearchConfig, SearchSpace, run_search
from mixq.search.cache import WeightCache, database_entries
from mixq.search.loop import score_assignment
from mixq.search.size import SizeModel
from mixq.search.starts import guided_starts
from mixq.solvers import get_solver

QE = "int3-g32:quantease:iterations=3"  # few sweeps: the tests check plumbing, not QuantEase
CHOICES = (QE, "int4-g32:gptq", "int3-g32:quantease:iterations=3,outliers=0.02", "int4-g32")
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The solvers' column loops on these tiny weights are thousands of small ops: one thread runs them
    several times faster than two that wait for each other (and for a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def key(windows):
    return DatabaseKey.of("a" * 64, "float32", CalibrationSet("text", "validation", 4, 16, 0, tensor_sha256(windows), BATCH))


@pytest.fixture(scope="module")
def pairs(base):
    space = SearchSpace(choices=CHOICES, granularity="layer")
    return database_entries(base, space, space.units(base))


@pytest.fixture(scope="module")
def reference(base, windows, key, pairs, tmp_path_factory):
    """Every layer at every choice, built at once."""
    db = LayerDatabase.open(tmp_path_factory.mktemp("ref") / "db", key)
    rep = build_database(base, db, pairs, windows, batch_size=BATCH, progress=False)
    assert rep.built == len(pairs) == 14 * len(CHOICES)
    return db


def _grams(model, windows):
    """Each Linear layer's input Gram over the base model's full forward pass, batch by batch."""
    grams, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."):
            grams[name] = Gram(m.in_features)
            hooks.append(m.register_forward_pre_hook(lambda _m, a, n=name: grams[n].add(a[0])))
    with torch.no_grad():
        for i in range(0, len(windows), BATCH):
            model(windows[i : i + BATCH], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: g.matrix for n, g in grams.items()}


def test_an_entry_is_the_solver_on_the_layer_weight_and_its_gram(base, windows, reference):
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    grams = _grams(base, windows)
    space = SearchSpace(choices=CHOICES)
    for layer in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        weight = read_weight(base, layer)
        for c in CHOICES:
            spec = space.spec(c)
            solver = get_solver(spec.solver)
            direct = solver(weight, spec.format, grams[layer], solver.options(spec.opts))
            assert torch.equal(reference.weight(layer, spec), direct.weight.to(weight.dtype)), (layer, c)
            entry = reference.entry(layer, spec)
            assert entry.bits == stored_bits(spec, tuple(weight.shape)) and entry.loss == pytest.approx(direct.loss)
            if c == QE:  # QuantEase starts from RTN and never increases the layer error
                assert entry.rel_error <= entry.rtn_rel_error * (1 + 1e-6)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # the build leaves the model alone
    outliers = reference.entry("model.layers.0.mlp.up_proj", space.spec(CHOICES[2]))
    assert outliers.bits > stored_bits(space.spec(QE), tuple(outliers.shape))  # the 16-bit outliers are counted


class Interrupted(Exception):
    pass


def test_a_build_interrupted_halfway_resumes_to_the_same_database(base, windows, key, pairs, reference, tmp_path,
                                                                   monkeypatch):
    real, written = store.write_shard, []

    def interrupted(tensors, path, metadata):
        if len(written) == 5:
            raise Interrupted
        written.append(path)
        real(tensors, path, metadata)

    monkeypatch.setattr(store, "write_shard", interrupted)
    pairs = [(n, s) for n, s in pairs if n.startswith("model.layers.1.") and s.solver != "rtn"]  # GPTQ and QuantEase
    half = pairs[: len(pairs) // 2]
    with pytest.raises(Interrupted):
        build_database(base, LayerDatabase.open(tmp_path / "db", key), half, windows, batch_size=BATCH, progress=False,
                       shard_bytes=1)  # a shard per entry
    monkeypatch.undo()
    db = LayerDatabase.open(tmp_path / "db", key)
    assert len(db) == 5
    assert build_database(base, db, half, windows, batch_size=BATCH, progress=False).built == len(half) - 5
    assert build_database(base, db, pairs, windows, batch_size=BATCH, progress=False).built == len(pairs) - len(half)
    again = LayerDatabase.open(tmp_path / "db", key)
    assert set(again.entries) == {entry_id(n, s) for n, s in pairs}
    for layer, spec in pairs:
        assert torch.equal(again.weight(layer, spec), reference.weight(layer, spec))


def test_a_full_disk_keeps_the_entries_written_and_a_rebuild_resumes(base, windows, key, pairs, reference, tmp_path,
                                                                     monkeypatch):
    real, saved = store.save_file, []

    def full_disk(tensors, filename, metadata=None):
        if len(saved) == 3:
            with open(filename, "wb") as fh:
                fh.write(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(store, "save_file", full_disk)
    rtn = [(n, s) for n, s in pairs if s.solver == "rtn"]
    with pytest.raises(DatabaseError, match="the disk is full.*the 3 entries written before stay valid"):
        build_database(base, LayerDatabase.open(tmp_path / "db", key), rtn, windows, batch_size=BATCH, progress=False,
                       shard_bytes=1)
    monkeypatch.undo()
    assert not list((tmp_path / "db").glob("*.tmp"))  # the torn shard was removed
    db = LayerDatabase.open(tmp_path / "db", key)
    assert len(db) == 3 and all(torch.equal(db.weight(n, s), reference.weight(n, s)) for n, s in rtn[:3])
    assert build_database(base, db, rtn, windows, batch_size=BATCH, progress=False).built == len(rtn) - 3
    assert all(torch.equal(db.weight(n, s), reference.weight(n, s)) for n, s in rtn)


def test_a_trial_on_the_database_is_quantize_with_independent_calibration(base, windows, reference):
    space = SearchSpace(choices=CHOICES, granularity="block", fixed=(("re:.*down_proj", SearchSpace().spec("int4-g32:gptq")),))
    units = space.units(base)
    cache = WeightCache.for_space(base, space, units, database=reference)
    assert set(cache.pinned) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    score = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    a = {units[0].name: QE, units[1].name: CHOICES[2]}
    trial = score_assignment(base, cache, units, a, score, SearchConfig(batch_size=BATCH))["ppl"]
    cache.restore()
    plan = space.plan(units, a)
    with quantized_copy(base, plan, calibration=windows, batch_size=BATCH, calibration_mode="independent") as (m, _):
        independent = perplexity(m, score, batch_size=BATCH).ppl
    with quantized_copy(base, plan, calibration=windows, batch_size=BATCH) as (m, _):
        sequential = perplexity(m, score, batch_size=BATCH).ppl
    assert trial == independent and sequential != independent


@pytest.mark.parametrize("backend,objective", [("tpe", "ppl"), ("ax", "ppl"), ("evo", "ppl"), ("nsga2", "pareto")])
def test_every_backend_searches_the_database(base, reference, tmp_path, backend, objective):
    space = SearchSpace(choices=CHOICES, granularity="block")
    units = space.units(base)
    cache = WeightCache.for_space(base, space, units, database=reference)
    score = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    config = SearchConfig(backend=backend, trials=4, max_bits=None if objective == "pareto" else 4.0, objective=objective,
                          batch_size=BATCH)
    meta = {"model_sha256": "x", "space": space.to_dict(), "max_bits": config.max_bits}
    trials = run_search(base, space, score, config, tmp_path / backend, meta=meta, progress=False, cache=cache)
    for t in trials[:2]:  # a trial's perplexity is that of the database's weights for its assignment
        again = score_assignment(base, cache, units, t["assignment"], score, config)["ppl"]
        assert again == t["ppl"] and (config.max_bits is None or t["bits_per_weight"] <= 4.0)
        assert {r["solver"] for r in t["plan"]["rules"]} <= {"quantease", "gptq", "rtn"}
    cache.restore()


def test_keys_name_every_input_and_refuse_another(key, reference):
    c = key.calibration
    changes = [dataclasses.replace(key, model_sha256="b" * 64), dataclasses.replace(key, dtype="float16"),
               dataclasses.replace(key, mixq_version="0.0.1")]
    changes += [dataclasses.replace(key, calibration=dataclasses.replace(c, **{f: v}))
                for f, v in [("dataset", "other"), ("split", "test"), ("nsamples", 8), ("seqlen", 32), ("seed", 1),
                             ("windows_sha256", "0" * 64), ("batch_size", 4)]]
    assert len({k.digest() for k in [key, *changes]}) == len(changes) + 1
    assert DatabaseKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    with pytest.raises(DatabaseError, match="built for another model"):
        LayerDatabase.open(reference.path, changes[0])
    with pytest.raises(DatabaseError, match="calibration nsamples 4, not 8"):
        LayerDatabase.open(reference.path, changes[5])
    spec = LayerSpec.of("int4-g32", "gptq")
    ids = {entry_id("model.layers.0.mlp.up_proj", s) for s in
           [spec, LayerSpec.of("int4-g32", "gptq", damp=0.02), LayerSpec.of("int4-g64", "gptq"), LayerSpec.of("int4-g32")]}
    ids.add(entry_id("model.layers.1.mlp.up_proj", spec))
    assert len(ids) == 5
    assert entry_id("x", spec) == entry_id("x", LayerSpec.of("int4-g32", "gptq", damp=0.01))  # defaults spelt out


def test_calibrated_choices_without_a_database_or_entries_are_refused(base, reference, tmp_path):
    space = SearchSpace(choices=("int4-g32", QE), granularity="block")
    units = space.units(base)
    with pytest.raises(MixqError, match="solver 'quantease' needs calibration data: give a layer database"):
        WeightCache.for_space(base, space, units)
    score = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    meta = {"model_sha256": "x", "space": space.to_dict(), "max_bits": 4.0}
    with pytest.raises(MixqError, match="needs calibration data"):
        run_search(base, space, score, SearchConfig(trials=2, max_bits=4.0), tmp_path / "r", meta=meta, progress=False)
    more = SearchSpace(choices=("int4-g32", "int3-g64:quantease:iterations=3"), granularity="block")
    with pytest.raises(DatabaseError, match="lacks 14 of the entries"):
        WeightCache.for_space(base, more, more.units(base), database=reference)


def test_the_cache_keeps_what_fits_and_reads_the_rest_again(base, reference):
    space = SearchSpace(choices=CHOICES, granularity="block")
    units = space.units(base)
    per_layer = read_weight(base, "model.layers.0.mlp.up_proj").numel() * 4
    cache = WeightCache.for_space(base, space, units, database=reference, device_bytes=3 * per_layer)
    for c in CHOICES:
        cache.apply(units, {u.name: c for u in units})
        assert cache.bytes <= 3 * per_layer
        w = read_weight(base, "model.layers.1.mlp.gate_proj")
        assert torch.equal(w, reference.weight("model.layers.1.mlp.gate_proj", space.spec(c)))
    cache.restore()


def test_choices_name_their_solver_and_count_its_bits(base):
    space = SearchSpace.from_dict({"solver": "quantease", "options": {"iterations": 3}, "granularity": "layer", "tied": [],
                                   "choices": ["int3-g32", "int4-g32:gptq",
                                               {"format": "int3-g32", "solver": "rtn", "options": {"outliers": 0.05}}]})
    assert space.choices == ("int3-g32", "int4-g32:gptq", "int3-g32:rtn:outliers=0.05")
    assert space.spec("int3-g32") == LayerSpec.of("int3-g32", "quantease", iterations=3)
    assert SearchSpace.from_dict(space.to_dict()) == space and space.needs_calibration()
    units = space.units(base)
    assert len(units) == 14  # tied: [] searches every layer alone
    size = SizeModel(space, units, base)
    for c in space.choices:
        a = {u.name: c for u in units}
        rep = space.plan(units, a).size_report(base)
        assert size(a) == (rep.bits_per_weight, rep.size_bytes)
    assert size({u.name: space.choices[2] for u in units})[0] > size({u.name: space.choices[0] for u in units})[0]
    with pytest.raises(MixqError, match="duplicate choices"):
        SearchSpace(choices=("int3-g32:quantease", "int3-g32"), solver="quantease")
    cli = SearchSpace(choices=("int3-g32", "int4-g32:rtn")).with_solver("gptq", {"damp": 0.02})  # mixq search --solver
    assert [cli.spec(c) for c in cli.choices] == [LayerSpec.of("int3-g32", "gptq", damp=0.02), LayerSpec.of("int4-g32")]


def test_database_search_sensitivity_and_allocate_cli(tiny_dir, data_dir, text_file, tmp_path, capsys):
    from mixq.cli import main
    from mixq.plan import Plan

    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"granularity": "block", "solver": "quantease", "options": {"iterations": 2},
                                 "choices": ["int3-g32", "int4-g32", "int8:rtn"]}))
    db = tmp_path / "db"
    calib = ["--calib-dataset", str(text_file), "--nsamples", "2", "--seqlen", "32", "--device", "cpu"]
    assert main(["database", "build", "--model", str(tiny_dir), "--space", str(space), "--db", str(db), *calib,
                 "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["built"] == built["entries"] == 14 * 3
    assert main(["database", "info", str(db)]) == 0
    assert f"{db}: 42 entries" in capsys.readouterr().out
    assert main(["database", "info", str(db), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert sorted({(e["format"], e["solver"]) for e in entries}) == [("int3-g32", "quantease"), ("int4-g32", "quantease"),
                                                                      ("int8", "rtn")]
    run = tmp_path / "run"
    argv = ["search", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--space", str(space), "--db", str(db),
            *calib, "--limit", "2", "--final-limit", "2", "--max-bits", "4.5", "--trials", "5", "--backend", "random",
            "--sequential-top", "1", "--json"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["database"]["built"] == 0 and report["database"]["entries"] == 14 * 3
    rows = {r["label"]: r for r in report["rows"]}
    kept = [r for label, r in rows.items() if label.startswith("best searched plan") and "(kept" in label]
    assert len(kept) == 1 and "best searched plan, sequential" in "".join(rows)
    solution = report["best"]["solution"]
    assert (run / "best_plan.yaml").read_text().startswith(f"# solution: {solution}")
    plan = Plan.load(run / "best_plan.yaml")
    assert {s.solver for _, s in plan.rules} <= {"quantease", "rtn"}
    # the plan file reproduces the reported perplexity with the calibration it names
    assert main(["eval", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--plan", str(run / "best_plan.yaml"),
                 "--calibration-mode", solution, *calib, "--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["ppl"] == kept[0]["ppl"]
    # another calibration set is refused by key, never reused
    i = argv.index("--nsamples")
    assert main([*argv[:i], "--nsamples", "3", *argv[i + 2 :], "--run-dir", str(tmp_path / "other")]) == 2
    assert "calibration nsamples 2, not 3" in capsys.readouterr().err
    # the measured sensitivity of the database's weights guides a search and allocates a plan
    sens = tmp_path / "sens.json"
    assert main(["sensitivity", "--model", str(tiny_dir), "--method", "measured", "--formats",
                 "int3-g32:quantease:iterations=2,int4-g32:quantease:iterations=2", "--db", str(db),
                 "--calib-dataset", str(text_file), "--nsamples", "2", "--seqlen", "24", "--out", str(sens),
                 "--device", "cpu", "--json"]) == 0
    data = json.loads(sens.read_text())
    layer = "model.layers.0.mlp.up_proj"
    got = LayerDatabase.open(db, LayerDatabase.read_key(db)).weight(layer, LayerSpec.of("int3-g32", "quantease", iterations=2))
    original = read_weight(tiny_llama(), layer)  # the saved folder's weights
    assert data["layers"][layer]["noise"]["int3-g32:quantease:iterations=2"] == pytest.approx(
        float((got - original).pow(2).sum()), rel=1e-5)
    searched = SearchSpace.load(space)
    model = tiny_llama()
    units = searched.units(model)
    size, config = SizeModel(searched, units, model), SearchConfig(max_bits=4.2)  # room for one block at int4-g32
    start, = guided_starts(data, searched, units, size, config, count=1, seed=0)
    assert sorted(start.assignment.values()) == ["int3-g32", "int4-g32"]  # scored under their long names, matched by spec
    with pytest.raises(MixqError, match="measure it on this space's choices"):  # int3-g32 scored with RTN
        guided_starts({**data, "choices": {"int3-g32": {"format": "int3-g32"}}}, searched, units, size, config, count=1,
                      seed=0)
    assert main(["allocate", "--sens", str(sens), "--max-bits", "3.9", "--out", str(tmp_path / "plan.yaml")]) == 0
    text = (tmp_path / "plan.yaml").read_text()
    assert text.startswith("# scored on layer-database weights: reproduce with --calibration-mode independent")
    assert {s.solver for _, s in Plan.load(tmp_path / "plan.yaml").rules} == {"quantease"}
