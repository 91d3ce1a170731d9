"""mixq plot-weights: a PNG of the chosen layers, built from their original and dequantised weights."""

from __future__ import annotations

import argparse
import json
import struct

import pytest
import torch

from mixq.commands import plot_weights as cmd
from mixq.errors import MixqError, PlanError
from mixq.formats import parse_format
from mixq.plan import Plan
from mixq.plots import DPI, ROW_IN, WIDTH_IN, plot_weights

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"
PLAN = Plan.from_dict({"rules": [{"match": Q, "format": "int3-tensor"}, {"match": DOWN, "format": "int4-g32"}]})


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_of_two_layers_sees_their_weights(model, tmp_path):
    out = tmp_path / "fig.png"
    res = plot_weights(model, PLAN, [Q, r"re:.*\.1\.mlp\.down_proj"], out)
    assert png_size(out) == (res["width"], res["height"]) == (int(WIDTH_IN * DPI), int(2 * ROW_IN * DPI))
    q_panel, down_panel = res["panels"]
    assert q_panel["layers"] == [Q] and down_panel["layers"] == [DOWN]
    assert q_panel["formats"] == ["int3-tensor"] and down_panel["formats"] == ["int4-g32"]
    for panel, name in ((q_panel, Q), (down_panel, DOWN)):
        w = model.get_submodule(name).weight.detach()
        dq = parse_format(panel["formats"][0]).fake_quantize(w)
        assert panel["weights"] == w.numel()
        assert panel["original"]["max"] == pytest.approx(float(w.max())) and panel["original"]["std"] == pytest.approx(float(w.std()))
        assert panel["dequantized"]["mean"] == pytest.approx(float(dq.mean()), abs=1e-7)
        assert panel["error"]["max_abs"] == pytest.approx(float((dq - w).abs().max()))
        assert sum(panel["counts"]["original"]) == sum(panel["counts"]["dequantized"]) == w.numel()
    # int3 per tensor: the layer's one grid, at most 8 levels, every dequantised value on it
    w = model.get_submodule(Q).weight.detach()
    assert q_panel["levels"] == torch.unique(parse_format("int3-tensor").fake_quantize(w)).tolist()
    assert 2 <= len(q_panel["levels"]) <= 8 and "per tensor" in q_panel["levels_note"]
    # int4-g32: the levels of the group of the largest |w|, at most 16, that group's own values
    w = model.get_submodule(DOWN).weight.detach()
    row, col = divmod(int(w.abs().argmax()), w.shape[1])
    group = parse_format("int4-g32").fake_quantize(w)[row, col // 32 * 32 : col // 32 * 32 + 32]
    assert down_panel["levels"] == torch.unique(group).tolist() and len(down_panel["levels"]) <= 16
    assert f"row {row}" in down_panel["levels_note"]


def test_pooled_layers_mark_no_level(model, tmp_path):
    out = tmp_path / "pool.png"
    res = plot_weights(model, Plan.uniform("int4-g32"), [r"re:.*q_proj"], out, pool=True)
    (panel,) = res["panels"]
    assert panel["layers"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert panel["levels"] is None and panel["weights"] == 2 * 64 * 64
    assert png_size(out) == (int(WIDTH_IN * DPI), int(ROW_IN * DPI))


def test_bad_layer_choices(model, tmp_path, monkeypatch):
    with pytest.raises(MixqError, match=r"--layer 're:.*nothing' matches none of the model's"):
        plot_weights(model, PLAN, [Q, "re:.*nothing"], tmp_path / "x.png")
    with pytest.raises(PlanError, match="leaves 'model.layers.0.self_attn.k_proj' unquantized"):
        plot_weights(model, PLAN, ["model.layers.0.self_attn.k_proj"], tmp_path / "x.png")
    monkeypatch.setattr("mixq.plots.MAX_LAYERS", 4)
    with pytest.raises(MixqError, match="matches 14 layers; one figure plots at most 4 rows"):
        plot_weights(model, Plan.uniform("int8"), ["re:model\\.layers\\..*"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_writes_the_png(capsys, tiny_dir, tmp_path):
    p = argparse.ArgumentParser()
    cmd.add_parser(p.add_subparsers())
    out = tmp_path / "cli.png"
    argv = ["plot-weights", "--model", str(tiny_dir), "--plan", "int4-g32", "--layer", Q, "--out", str(out),
            "--device", "cpu", "--json"]
    assert cmd.run(p.parse_args(argv)) == 0
    res = json.loads(capsys.readouterr().out)
    assert png_size(out) == (res["width"], res["height"]) and res["panels"][0]["layers"] == [Q]
    with pytest.raises(MixqError, match="matches none"):
        cmd.run(p.parse_args([*argv[:6], "q_proj", *argv[7:]]))
