"""Data: WikiText rows, windows, seeded calibration draws, clear errors."""

from __future__ import annotations

import random

import pytest
import torch

from mixq.data import calibration_windows, load_text, wikitext_text, windows
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
    with pytest.raises(DataError, match="--data-dir DIR or set MIXQ_DATA_DIR"):
        load_text("wikitext2", "test")
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
