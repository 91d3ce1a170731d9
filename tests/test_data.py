"""Data: WikiText rows, windows, seeded calibration draws, clear errors."""

from __future__ import annotations

import random

import pytest
import torch

from mixq.data import (EXCERPT, calibration_windows, hub_reachable, load_text, text_source, wikitext_text,
                       windows)
from mixq.errors import DataError


def test_wikitext_rows_rebuilt_and_joined():
    raw = " \n = Title = \n \n Body line . \n"
    # HF rows: "", " = Title = \n", "", " Body line . \n"
    assert wikitext_text(raw) == "\n\n = Title = \n" + "\n\n" + "" + "\n\n" + " Body line . \n"


def test_windows_drop_remainder_and_limit():
    ids = torch.arange(25)
    w = windows(ids, 10)
    assert w.shape == (2, 10) and w[1, 0] == 10
    assert windows(ids, 10, limit=1).shape == (1, 10)
    b = windows(ids, 10, bos=99)
    assert b.shape == (2, 10) and (b[:, 0] == 99).all() and b[1, 1] == 9
    with pytest.raises(DataError, match="fewer than one window"):
        windows(torch.arange(5), 10)


def test_calibration_windows_as_gptq_draws():
    ids = torch.arange(1000)
    got = calibration_windows(ids, 4, 100, seed=0)
    random.seed(0)
    starts = [random.randint(0, 1000 - 100 - 1) for _ in range(4)]
    assert got[:, 0].tolist() == starts
    assert torch.equal(got, calibration_windows(ids, 4, 100, seed=0))
    assert not torch.equal(got, calibration_windows(ids, 4, 100, seed=1))
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(torch.arange(50), 1, 100)


def test_missing_data_dir_says_how(monkeypatch):
    monkeypatch.delenv("MIXQ_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="not found"):
        load_text("wikitext2", "test", root="/nonexistent")
    with pytest.raises(DataError, match="no split"):
        load_text("wikitext2", "train", root="/nonexistent")
    with pytest.raises(DataError, match="neither a file"):
        load_text("c4")


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="'text' field"):
        load_text(str(tmp_path / "c.jsonl"))


def test_real_wikitext_split(data_dir):
    text = load_text("wikitext2", "test", root=data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert len(text) == 1294336  # rows rebuilt as the HF dataset, joined with blank lines


# -- where a named dataset comes from: data directory > hub (when reachable) > packaged excerpt ----------
EXCERPT_LINES = {"test": 322, "validation": 346}  # the excerpt's NOTICE.md: the first 322 / 346 lines


@pytest.fixture
def no_data_dir(monkeypatch):
    monkeypatch.delenv("MIXQ_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("split", ["test", "validation"])
def test_excerpt_without_a_data_dir_says_so(no_data_dir, capsys, split):
    source = text_source("wikitext2", split)
    assert source.kind == "excerpt"
    text = load_text("wikitext2", split)
    note = capsys.readouterr().err.strip()
    assert note == source.note and note.startswith(f"wikitext2/{split}: no data directory given; using the packaged excerpt")
    assert f"({EXCERPT_LINES[split]} lines of the {split} split, CC BY-SA 4.0)" in note and "not comparable" in note
    raw = EXCERPT.joinpath(f"wikitext2/{split}.raw").read_text(encoding="utf-8")
    assert raw.count("\n") == EXCERPT_LINES[split] and raw.endswith(" \n")  # whole articles, ending on a blank row
    # the same rows as the data directory protocol gives for that many lines: one empty row per blank line
    assert text == wikitext_text(raw) and text.count("\n\n\n\n") > 0
    assert text.startswith({"test": "\n\n = Robert Boulter = \n", "validation": "\n\n = Homarus gammarus = \n"}[split])
    assert len(raw.encode()) < 110_000  # small enough to ship (a few hundred KB for both splits)


def test_excerpt_is_the_head_of_the_split(data_dir):
    for split, n in EXCERPT_LINES.items():
        full = (data_dir / "wikitext2" / f"{split}.raw").read_text(encoding="utf-8")
        head = "".join(full.splitlines(keepends=True)[:n])
        assert EXCERPT.joinpath(f"wikitext2/{split}.raw").read_text(encoding="utf-8") == head  # unmodified


def test_data_dir_comes_first(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("mixq.data._read_hub", _no_hub)
    assert text_source("wikitext2", "test", root=data_dir).kind == "data dir"
    assert len(load_text("wikitext2", "test", root=data_dir)) == 1294336 and capsys.readouterr().err == ""
    monkeypatch.setenv("MIXQ_DATA_DIR", str(data_dir))
    assert text_source("wikitext2", "validation").kind == "data dir"


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub must not be asked")


def test_the_hub_when_reachable(monkeypatch, capsys):
    """Online (HF_HUB_OFFLINE not 1) with ``datasets`` installed and no data directory, the rows of
    wikitext-2-raw-v1 come from the hub, joined as the data directory's rebuilt rows are.  (Importing
    ``datasets`` takes seconds; lm-eval imports it too.)"""
    pytest.importorskip("datasets")
    monkeypatch.delenv("MIXQ_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    raw = " \n = Title = \n \n Body line . \n"
    rows = ["", " = Title = \n", "", " Body line . \n"]  # the HF rows of those lines
    calls = []

    def fake_load_dataset(path, name=None, *, split=None):
        calls.append((path, name, split))
        return {"text": rows}

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    source = text_source("wikitext2", "validation")
    assert (source.kind, source.where, source.note) == ("hub", "Salesforce/wikitext/wikitext-2-raw-v1", None)
    assert calls == []  # resolving where the text comes from downloads nothing
    assert load_text("wikitext2", "validation") == wikitext_text(raw)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "validation")] and capsys.readouterr().err == ""

    def failing(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub\nsecond line")

    monkeypatch.setattr("datasets.load_dataset", failing)
    with pytest.raises(DataError, match=r"from the Hugging Face hub failed \(ConnectionError: Couldn't reach "
                                        r"'Salesforce/wikitext' on the Hub\); pass --data-dir") as e:
        load_text("wikitext2", "test")
    assert "\n" not in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # either switch keeps it off the hub
        monkeypatch.setenv(offline, "1")
        assert text_source("wikitext2", "test").kind == "excerpt"
        monkeypatch.setenv(offline, "0")


def test_the_hub_needs_datasets(monkeypatch):
    import importlib.util

    monkeypatch.delenv("MIXQ_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    assert not hub_reachable() and text_source("wikitext2", "test").kind == "excerpt"


def test_without_an_excerpt_the_error_stays(no_data_dir, monkeypatch, tmp_path):
    monkeypatch.setattr("mixq.data.EXCERPT", tmp_path)  # an install without the package data
    with pytest.raises(DataError, match=r"wikitext2 needs a data directory: pass --data-dir DIR or set MIXQ_DATA_DIR=DIR "
                                        r"\(DIR holding wikitext2/test.raw\)"):
        load_text("wikitext2", "test")


def test_the_cli_is_offline_unless_told(monkeypatch, capsys):
    """``mixq`` sets HF_HUB_OFFLINE=1 unless the environment sets it: the hub only with HF_HUB_OFFLINE=0."""
    import os

    from mixq.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # set by an earlier zero-shot evaluation, if any
    assert main(["formats", "--json"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and not hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert main(["formats", "--json"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "0" and hub_reachable()
