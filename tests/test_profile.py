"""mixq profile: exact weight statistics, exact running input statistics with sampled
percentiles, and the fixed-point fraction widths a profile gives a fraction: profile space."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mixq.commands import profile as cmd
from mixq.errors import PlanError
from mixq.profile import fraction_bits, fraction_format, profile_model, read_absmax, tensor_stats
from mixq.search import SearchConfig, SearchSpace, run_search
from mixq.search.cache import WeightCache
from mixq.search.size import SizeModel

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
ABSMAX = dict(zip(KINDS, (0.75, 3.0, 1.0, 0.3, 5.5, 0.5, 2.0)))
# width − 1 − ceil(log2 max|w|), by hand: ceil(log2) of the maxima above is 0, 2, 0, -1, 3, -1, 1
FRACTIONS = {8: dict(zip(KINDS, (7, 5, 7, 8, 4, 8, 6))), 4: dict(zip(KINDS, (3, 1, 3, 4, 0, 4, 2)))}


@pytest.fixture
def known(model):
    """The tiny model with every Linear weight spread evenly over [-a, a], a set per layer kind."""
    with torch.no_grad():
        for name, m in model.named_modules():
            kind = ".".join(name.split(".")[-2:])
            if kind in ABSMAX:
                a = ABSMAX[kind]
                m.weight.copy_(torch.linspace(-a, a, m.weight.numel()).reshape(m.weight.shape))
    return model


def test_fraction_rule_by_hand():
    assert [fraction_bits(8, a) for a in ABSMAX.values()] == list(FRACTIONS[8].values())
    assert fraction_bits(8, 1.0) == 7 and fraction_bits(8, 1.0001) == 6 and fraction_bits(8, 0.25) == 9
    assert fraction_format("x", 8, 3.0) == "fxp8-f5" and fraction_format("x", 8, 0.3) == "fxp8-f8"
    with pytest.raises(PlanError, match=r"layer 'x': fxp4 with profiled max \|w\| 0.1 gets 6 fraction bits "
                                        r"\(4 − 1 − ceil\(log2 0.1\) = 6\), more than the width 4"):
        fraction_format("x", 4, 0.1)
    with pytest.raises(PlanError, match="gets -2 fraction bits"):
        fraction_format("x", 4, 20.0)
    with pytest.raises(PlanError, match="positive, finite"):
        fraction_bits(8, 0.0)


def test_tensor_stats_are_numpys():
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(0)) * 3 + 1
    s = tensor_stats(x, (0.1, 1, 50, 99, 99.9))
    a = x.double().numpy()
    assert s["min"] == a.min() and s["max"] == a.max() and s["absmax"] == np.abs(a).max()
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-12) and s["std"] == pytest.approx(a.std(), rel=1e-12)
    assert list(s["percentiles"]) == ["0.1", "1", "50", "99", "99.9"]
    assert list(s["percentiles"].values()) == pytest.approx(np.percentile(a, [0.1, 1, 50, 99, 99.9]), rel=1e-12)


def _inputs(model, windows):
    """Every input of every Linear layer, kept (what the profile must not need to do)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, []).append(args[0].flatten()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    with torch.no_grad():
        for i in range(0, len(windows), 2):
            model(windows[i : i + 2], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_profile_weights_and_inputs(model):
    windows = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(1))
    exact = profile_model(model, windows, batch_size=2, sample_size=10**7)
    sampled = profile_model(model, windows, batch_size=2, sample_size=2000, seed=3)
    inputs = _inputs(model, windows)
    assert len(exact) == 14 and set(exact) == set(inputs)
    for name, x in inputs.items():
        w = model.get_submodule(name).weight.detach().double()
        assert exact[name]["shape"] == list(w.shape)
        assert exact[name]["weight"]["absmax"] == float(w.abs().max())
        assert exact[name]["weight"]["std"] == pytest.approx(float(w.std(unbiased=False)), rel=1e-12)
        for p in (exact[name]["input"], sampled[name]["input"]):  # one pass, nothing kept: still exact
            assert p["count"] == x.numel() == 5 * 24 * w.shape[1]
            assert p["min"] == pytest.approx(float(x.min())) and p["max"] == pytest.approx(float(x.max()))
            assert p["mean"] == pytest.approx(float(x.mean()), abs=1e-9)
            assert p["std"] == pytest.approx(float(x.std(unbiased=False)), rel=1e-9)
        want = np.percentile(x.numpy(), [0.1, 1, 50, 99, 99.9])
        assert list(exact[name]["input"]["percentiles"].values()) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert exact[name]["input"]["sampled"] == x.numel()
        # sampled: ~2000 elements; the median within a few hundredths of the spread
        s = sampled[name]["input"]
        assert abs(s["sampled"] - 2000) < 50
        assert abs(s["percentiles"]["50"] - want[2]) < 0.1 * float(x.std())
        assert float(x.min()) <= s["percentiles"]["0.1"] <= s["percentiles"]["99.9"] <= float(x.max())
    assert sampled == profile_model(model, windows, batch_size=2, sample_size=2000, seed=3)  # seeded


def test_fraction_profile_space_gives_each_layer_its_width(known, tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"layers": profile_model(known)}))
    assert read_absmax(profile)["model.layers.1.mlp.gate_proj"] == pytest.approx(5.5)
    space = SearchSpace.from_dict({"granularity": "block", "choices": ["fxp4", "fxp8"], "fraction": "profile",
                                   "profile": str(profile)})
    assert SearchSpace.from_dict(space.to_dict()) == space
    units = space.units(known)
    for width in (4, 8):
        for name in (n for u in units for n in u.layers):
            want = f"fxp{width}-f{FRACTIONS[width][name.split('.', 3)[3]]}"
            assert space.format_of(name, f"fxp{width}") == want
    plan = space.plan(units, {u.name: "fxp8" for u in units})
    specs = plan.resolve(known)
    assert specs["model.layers.0.mlp.gate_proj"].format.name == "fxp8-f4"
    assert specs["model.layers.1.self_attn.o_proj"].format.name == "fxp8-f8"
    # no stored scale: fxp8 costs exactly 8 bits per weight, whatever the fractions
    size = SizeModel(space, units, known)
    assert size({u.name: "fxp8" for u in units})[0] == pytest.approx(8.0)
    assert size({u.name: "fxp4" for u in units})[0] == pytest.approx(4.0)
    # the cache quantizes each layer with its own fraction: 0.1 -> round(0.1 * 2^F) / 2^F on a grid of 2^-F
    cache = WeightCache.for_space(known, space, units)
    w = cache.weight("model.layers.0.self_attn.k_proj", "fxp8")  # max |w| 3.0: F = 5, steps of 1/32
    orig = known.get_submodule("model.layers.0.self_attn.k_proj").weight.detach()
    assert torch.equal(w, torch.round(orig * 32) / 32)
    w4 = cache.weight("model.layers.0.mlp.gate_proj", "fxp4")  # max |w| 5.5: F = 0, integers; ±5.5 -> ±6 (to even)
    assert torch.equal(w4, torch.round(known.get_submodule("model.layers.0.mlp.gate_proj").weight.detach()))
    assert float(w4.max()) == 6.0 and float(w4.min()) == -6.0
    v = cache.weight("model.layers.0.self_attn.v_proj", "fxp8")  # max |w| 1.0: F = 7, codes -128..127: 1.0 saturates
    assert float(v.max()) == 127 / 128 and float(v.min()) == -1.0
    assert space.uniform("fxp4", units).resolve(known)["model.layers.1.mlp.up_proj"].format.name == "fxp4-f4"


def test_fraction_wider_than_the_width_is_refused(known, tmp_path):
    with torch.no_grad():
        known.get_submodule("model.layers.1.self_attn.v_proj").weight.mul_(0.1)  # max |w| 0.1
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"layers": profile_model(known)}))
    space = SearchSpace.from_dict({"choices": ["fxp4", "fxp8"], "fraction": "profile", "profile": str(profile)})
    units = space.units(known)
    with pytest.raises(PlanError, match="layer 'model.layers.1.self_attn.v_proj': fxp4 with profiled max |w| 0.1 "
                                        "gets 6 fraction bits"):
        SizeModel(space, units, known)


def test_bad_fraction_spaces(tmp_path):
    with pytest.raises(PlanError, match="the choices are fixed-point widths"):
        SearchSpace.from_dict({"choices": ["fxp4", "int8"], "fraction": "profile"})
    with pytest.raises(PlanError, match="fraction 'stats' is not one of profile"):
        SearchSpace.from_dict({"choices": ["fxp4"], "fraction": "stats"})
    with pytest.raises(PlanError, match="needs fraction: profile"):
        SearchSpace().with_profile(tmp_path / "p.json")
    with pytest.raises(PlanError, match="profile file not found"):
        SearchSpace(choices=("fxp8",), fraction="profile").with_profile(tmp_path / "p.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="is not a profile"):
        read_absmax(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="needs a profile"):
        SearchSpace(choices=("fxp8",), fraction="profile").format_of("model.layers.0.mlp.up_proj", "fxp8")


def test_a_fraction_profile_search_runs(known, tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"layers": profile_model(known)}))
    space = SearchSpace(choices=("fxp4", "fxp8"), granularity="block", fraction="profile").with_profile(profile)
    score = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    meta = {"model_sha256": "x", "space": space.to_dict(), "objective": "ppl", "max_bits": 6.0}
    trials = run_search(known, space, score, SearchConfig(backend="random", trials=4, max_bits=6.0), tmp_path / "r",
                        meta=meta, progress=False)
    assert all(t["bits_per_weight"] <= 6.0 for t in trials)
    rules = {r["match"]: r["format"] for r in trials[0]["plan"]["rules"]}
    assert rules["model.layers.0.mlp.down_proj"] in ("fxp4-f2", "fxp8-f6")


def test_profile_cli(capsys, tiny_dir, text_file, tmp_path):
    p = argparse.ArgumentParser()
    p.set_defaults(command_line="mixq profile")
    cmd.add_parser(p.add_subparsers())
    out = tmp_path / "profile.json"
    assert cmd.run(p.parse_args(["profile", "--model", str(tiny_dir), "--out", str(out), "--dataset", str(text_file),
                                 "--nsamples", "3", "--seqlen", "16", "--device", "cpu", "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 14
    data = json.loads(out.read_text())
    layer = data["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["input"]["count"] == 3 * 16 * 64 and set(layer["weight"]["percentiles"]) == {"0.1", "1", "50", "99", "99.9"}
    assert data["inputs"]["nsamples"] == 3 and data["provenance"]["seed"] == 0
    assert cmd.run(p.parse_args(["profile", "--model", str(tiny_dir), "--out", str(out), "--weights-only",
                                 "--percentiles", "5,95", "--device", "cpu"])) == 0
    data = json.loads(out.read_text())
    assert data["inputs"] is None and "input" not in data["layers"]["model.layers.1.mlp.up_proj"]
    assert list(data["layers"]["model.layers.1.mlp.up_proj"]["weight"]["percentiles"]) == ["5", "95"]
