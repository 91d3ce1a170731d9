"""The first seed's Ax files: a parameter-space file maps onto a block space and back, initial
samples become starts, blocks with fewer choices keep to them in every trial."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch

from mixq.cli import main
from mixq.errors import PlanError
from mixq.search import SearchConfig, SearchSpace, Start, run_search
from mixq.search.seed_files import SeedSpace, read_samples, read_space, samples_of, seed_space_of
from mixq.search.size import SizeModel, mutate, project, repair

BITS, GROUPS = [2, 3, 4, 5, 6, 8], [32, 64, 128, 256]
# the seed's layout for a 30-block model; the last two blocks keep groups of 64 and search the bit width
SEED = {"parameters": [
    {"name": "bitwidth", "name_format": "bitwidth.{i}.",
     "layers": [{"range": [0, 3], "type": "fixed", "value": 5},
                {"range": [3, 30], "type": "choice", "values": BITS}]},
    {"name": "groupsize", "name_format": "groupsize.{i}.",
     "layers": [{"range": [0, 3], "type": "fixed", "value": 32},
                {"range": [3, 28], "type": "choice", "values": GROUPS},
                {"range": [28, 30], "type": "fixed", "value": 64}]}]}


@pytest.fixture(scope="module")
def model30():
    """A Llama with 30 tiny blocks (SmolLM2 has 30), rows of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _samples(n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = {}
        for i in range(30):
            fixed = i < 3
            s[f"bitwidth.{i}."] = 5 if fixed else rng.choice(BITS)
            s[f"groupsize.{i}."] = 32 if fixed else (64 if i >= 28 else rng.choice(GROUPS))
        out.append(s)
    return {"initial_samples": out}


def test_seed_file_maps_onto_block_units():
    space = SeedSpace.from_dict(SEED).to_search_space("model.layers", 30)
    assert space.granularity == "block"
    assert space.choices == tuple(f"int{b}-g{g}" for b in BITS for g in GROUPS)
    assert [m for m, _ in space.fixed] == [rf"re:model\.layers\.{i}\..+" for i in range(3)]
    assert {s.format.name for _, s in space.fixed} == {"int5-g32"}
    # blocks 3..27 choose among all 24 formats; 28 and 29 among the six widths with groups of 64
    assert space.choices_of("model.layers.3") == space.choices_of("model.layers.27") == space.choices
    assert space.choices_of("model.layers.28") == space.choices_of("model.layers.29") == \
        tuple(f"int{b}-g64" for b in BITS)
    assert [m for m, _ in space.allowed] == ["model.layers.28", "model.layers.29"]
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_seed_file_round_trips_through_a_space(model30, tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(SEED))
    given = read_space(str(path))
    assert isinstance(given, SeedSpace) and given.to_dict() == SEED
    space = given.to_search_space("model.layers", 30)
    units = space.units(model30)
    assert [u.name for u in units] == [f"model.layers.{i}" for i in range(3, 30)]
    assert all(len(u.layers) == 7 for u in units)
    assert seed_space_of(space, model30).to_dict() == SEED


def test_initial_samples_become_starts_and_round_trip(model30, tmp_path):
    space = SeedSpace.from_dict(SEED).to_search_space("model.layers", 30)
    samples = _samples(3)
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(samples))
    starts = read_samples(path, space, model30)
    assert [s.label for s in starts] == [f"seed sample {k} (samples.json)" for k in range(3)]
    first = samples["initial_samples"][0]
    assert starts[0].assignment["model.layers.7"] == f"int{first['bitwidth.7.']}-g{first['groupsize.7.']}"
    assert set(starts[0].assignment) == {f"model.layers.{i}" for i in range(3, 30)}
    assert samples_of(space, model30, [s.assignment for s in starts]) == samples


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["parameters"][0]["layers"][0].update(range=[0, 4]),
     "bitwidth range [0, 4] overlaps range [3, 30] (blocks 3 to 3)"),
    (lambda d: d["parameters"][1]["layers"][2].update(range=[28, 32]),
     "groupsize range [28, 32] reaches past the model's 30 blocks (0 to 29"),
    (lambda d: d["parameters"][0]["layers"][1].update(range=[3, 28]), "bitwidth: block(s) 28-29 are in no range"),
    (lambda d: d["parameters"][0]["layers"][1].update(values=[2, 9]), "bit width 9"),
    (lambda d: d["parameters"][0]["layers"][1].update(type="range"), "'type' must be 'fixed' or 'choice'"),
    (lambda d: d["parameters"].pop(), "no groupsize parameter"),
    (lambda d: d["parameters"][0]["layers"][0].update(range=[3, 3]), "'range' must be [start, end]"),
])
def test_bad_seed_files_name_the_range(edit, message):
    d = copy.deepcopy(SEED)
    edit(d)
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        SeedSpace.from_dict(d).to_search_space("model.layers", 30)


def test_bad_samples(model30, tmp_path):
    space = SeedSpace.from_dict(SEED).to_search_space("model.layers", 30)
    path = tmp_path / "s.json"
    for edit, message in [({"bitwidth.4.": 7}, "block 4: bit width 7, group size"),
                          ({"groupsize.29.": 32}, "block 29: bit width"),
                          ({"bitwidth.1.": 8}, "block 1 is fixed at int5-g32"),
                          ({"bitwidth.30.": 4}, "'bitwidth.30.' names no block of the model's 30")]:
        samples = _samples(1)
        samples["initial_samples"][0].update(edit)
        path.write_text(json.dumps(samples))
        with pytest.raises(PlanError, match=message):
            read_samples(path, space, model30)


def test_a_space_the_seed_files_cannot_hold(model):
    with pytest.raises(PlanError, match="one bit width and group size per block"):
        seed_space_of(SearchSpace(choices=("int4-g32", "int8"), granularity="layer"), model)
    with pytest.raises(PlanError, match="asymmetric integer formats with groups"):
        seed_space_of(SearchSpace(choices=("int4-g32", "nf4-g32")), model)
    with pytest.raises(PlanError, match="not every bit width with every group size"):
        seed_space_of(SearchSpace(choices=("int4-g32", "int8-g64")), model)


# -- units restricted to fewer choices ----------------------------------------------------
RESTRICTED = SearchSpace(choices=("int2-g32", "int3-g32", "int4-g32", "int8-g32"), granularity="block",
                         allowed=(("model.layers.1", ("int4-g32", "int8-g32")),))


def test_project_repair_and_mutate_keep_to_the_allowed_choices(model):
    units = RESTRICTED.units(model)
    assert project(RESTRICTED, units, {"model.layers.0": "int2-g32", "model.layers.1": "int2-g32"}) == \
        {"model.layers.0": "int2-g32", "model.layers.1": "int4-g32"}  # the nearest allowed in cost
    assert project(RESTRICTED, units, {"model.layers.0": "int8-g32", "model.layers.1": "int3-g32"}) == \
        {"model.layers.0": "int8-g32", "model.layers.1": "int4-g32"}
    size = SizeModel(RESTRICTED, units, model)
    fits = lambda a: size(a)[0] <= 4.0  # noqa: E731
    fixed = repair(RESTRICTED, units, {"model.layers.0": "int8-g32", "model.layers.1": "int8-g32"}, fits)
    assert fixed["model.layers.1"] == "int4-g32" and fits(fixed)  # block 1 never steps below int4-g32
    rng = random.Random(0)
    for _ in range(20):
        a = mutate(RESTRICTED, units, fixed, fits, rng)
        assert a["model.layers.1"] in ("int4-g32", "int8-g32") and fits(a)
    with pytest.raises(PlanError, match="no plan of this space fits"):
        repair(RESTRICTED, units, fixed, lambda a: size(a)[0] <= 3.0)


@pytest.mark.parametrize("backend", ["random", "tpe", "evo"])
def test_every_trial_keeps_to_the_allowed_choices(model, tmp_path, backend):
    score = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    meta = {"model_sha256": "x", "space": RESTRICTED.to_dict(), "objective": "ppl", "max_bits": 5.0}
    trials = run_search(model, RESTRICTED, score, SearchConfig(backend=backend, trials=8, max_bits=5.0, seed=2),
                        tmp_path / backend, meta=meta, progress=False,
                        initial=[Start("uniform int2-g32", {"model.layers.0": "int2-g32", "model.layers.1": "int2-g32"})])
    assert len(trials) == 8
    assert all(t["assignment"]["model.layers.1"] in ("int4-g32", "int8-g32") for t in trials)
    assert all(t["bits_per_weight"] <= 5.0 for t in trials)
    assert trials[0]["start"] == "uniform int2-g32 (projected onto the units' allowed choices)"


def test_search_cli_reads_and_writes_the_seed_files(tiny_dir, data_dir, tmp_path):
    params = {"parameters": [
        {"name": "bitwidth", "name_format": "bitwidth.{i}.",
         "layers": [{"range": [0, 1], "type": "fixed", "value": 8}, {"range": [1, 2], "type": "choice", "values": [2, 4]}]},
        {"name": "groupsize", "name_format": "groupsize.{i}.",
         "layers": [{"range": [0, 2], "type": "choice", "values": [32, 64]}]}]}
    samples = {"initial_samples": [{"bitwidth.0.": 8, "groupsize.0.": 64, "bitwidth.1.": 4, "groupsize.1.": 32}]}
    (tmp_path / "params.json").write_text(json.dumps(params))
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    run_dir, out = tmp_path / "run", tmp_path / "seed_out"
    argv = ["search", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--max-bits", "7", "--backend", "random",
            "--space", str(tmp_path / "params.json"), "--initial", str(tmp_path / "samples.json"),
            "--export-seed-files", str(out), "--trials", "6", "--run-dir", str(run_dir), "--seqlen", "32",
            "--limit", "2", "--final-limit", "2", "--device", "cpu", "--json"]
    assert main(argv) == 0
    trials = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    sample = next(t for t in trials if "seed sample 0 (samples.json)" in t.get("start", ""))
    assert sample["assignment"] == {"model.layers.0": "int8-g64", "model.layers.1": "int4-g32"}
    for t in trials:  # block 0 keeps its 8 bits: int8 with either group size
        assert t["assignment"]["model.layers.0"] in ("int8-g32", "int8-g64")
    assert json.loads((out / "parameters.json").read_text()) == params
    exported = json.loads((out / "initial_samples.json").read_text())["initial_samples"]
    best = json.loads((run_dir / "report.json").read_text())["best"]["assignment"]
    want = {}
    for i in range(2):
        bits, group = re.fullmatch(r"int(\d)-g(\d+)", best[f"model.layers.{i}"]).groups()
        want |= {f"bitwidth.{i}.": int(bits), f"groupsize.{i}.": int(group)}
    assert exported[0] == want
    assert 1 <= len(exported) <= 5
