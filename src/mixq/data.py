"""Text data: named datasets read from a data directory, plain files, token windows."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from mixq.errors import DataError

DATA_ENV = "MIXQ_DATA_DIR"
NAMED = {"wikitext2": {"test": "wikitext2/test.raw", "validation": "wikitext2/validation.raw"}}
#: the Hugging Face dataset (repository, configuration) a named dataset is when read from the hub;
#: "Salesforce/wikitext" is the canonical name of the legacy "wikitext"
HUB = {"wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1")}
#: a data directory shipped in the package: the head of each split (see its NOTICE.md)
EXCERPT = resources.files("mixq") / "excerpt"
EXCERPT_LICENCE = "CC BY-SA 4.0"
_TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub reads as true in HF_HUB_OFFLINE


def data_dir(flag: str | os.PathLike | None = None) -> Path | None:
    value = flag or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def hub_reachable() -> bool:
    """Whether a named dataset may come from the Hugging Face hub: ``datasets`` is installed and
    neither ``HF_HUB_OFFLINE`` nor ``HF_DATASETS_OFFLINE`` is set to 1 (``mixq``'s command line sets
    ``HF_HUB_OFFLINE=1`` unless the environment already sets it)."""
    offline = any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return not offline and importlib.util.find_spec("datasets") is not None


def wikitext_text(raw: str) -> str:
    """Rebuild HF ``wikitext-2-raw-v1`` rows and join them with blank lines (GPTQ protocol).

    Each line with text keeps its trailing newline; an empty or all-white-space line is
    an empty row; rows are joined with ``"\\n\\n"``.
    """
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")]
    if raw.endswith("\n"):
        rows.pop()  # the split after the final newline is not a row
    return "\n\n".join(rows)


@dataclass(frozen=True)
class TextSource:
    """Where the text of a dataset and split is read from: ``kind`` is "file", "data dir", "hub"
    or "excerpt"; ``where`` the path or hub name; ``note`` what a user must be told (the excerpt)."""

    dataset: str
    split: str
    kind: str
    where: str
    note: str | None = None

    def read(self) -> str:
        if self.kind == "file":
            return _read_file(Path(self.where))
        if self.kind == "hub":
            return _read_hub(self.dataset, self.split)
        file = EXCERPT.joinpath(NAMED[self.dataset][self.split]) if self.kind == "excerpt" else Path(self.where)
        return wikitext_text(file.read_text(encoding="utf-8"))


def text_source(dataset: str, split: str = "test", *, root: str | os.PathLike | None = None) -> TextSource:
    """Where :func:`load_text` reads ``dataset``/``split`` from; nothing is read or downloaded.

    A path to a file is that file.  A named dataset (``wikitext2``) is read, in this order, from
    (1) the data directory (``root``, else ``$MIXQ_DATA_DIR``); (2) the Hugging Face hub when it is
    reachable (:func:`hub_reachable`); (3) the excerpt shipped in the package, with a note that
    its numbers are not comparable with the full split's.
    """
    path = Path(dataset).expanduser()
    if path.is_file():
        return TextSource(dataset, split, "file", str(path))
    if dataset not in NAMED:
        raise DataError(f"dataset {dataset!r} is neither a file nor a named dataset ({', '.join(NAMED)})")
    if split not in NAMED[dataset]:
        raise DataError(f"{dataset} has no split {split!r} (splits: {', '.join(NAMED[dataset])})")
    root_dir = data_dir(root)
    if root_dir is not None:
        file = root_dir / NAMED[dataset][split]
        if not file.is_file():
            raise DataError(f"{dataset}/{split}: {file} not found (check --data-dir / {DATA_ENV})")
        return TextSource(dataset, split, "data dir", str(file))
    if dataset in HUB and hub_reachable():
        repo, config = HUB[dataset]
        return TextSource(dataset, split, "hub", f"{repo}/{config}")
    excerpt = EXCERPT.joinpath(NAMED[dataset][split])
    if excerpt.is_file():
        lines = excerpt.read_text(encoding="utf-8").count("\n")
        return TextSource(dataset, split, "excerpt", str(excerpt), note=(
            f"{dataset}/{split}: no data directory given; using the packaged excerpt ({lines} lines of the {split} "
            f"split, {EXCERPT_LICENCE}); perplexities are not comparable with the full split"))
    raise DataError(
        f"{dataset} needs a data directory: pass --data-dir DIR or set {DATA_ENV}=DIR "
        f"(DIR holding {NAMED[dataset][split]}), or give a text file path instead"
    )


def load_text(dataset: str, split: str = "test", *, root: str | os.PathLike | None = None) -> str:
    """A .txt/.raw/.jsonl file, or a named dataset (``wikitext2``) as the HF dataset's rows joined
    with blank lines.

    Precedence for a named dataset: the data directory (``root``, else ``$MIXQ_DATA_DIR``) > the
    Hugging Face hub when reachable (``datasets`` installed, ``HF_HUB_OFFLINE`` not 1; the ``mixq``
    command line is offline unless run with ``HF_HUB_OFFLINE=0``) > the excerpt shipped in the
    package, in which case a note saying so is printed on stderr.  See :func:`text_source`.
    """
    source = text_source(dataset, split, root=root)
    if source.note:
        print(source.note, file=sys.stderr, flush=True)
    return source.read()


def _read_file(path: Path) -> str:
    if path.suffix != ".jsonl":
        return path.read_text()
    texts = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{i + 1}: each line must be a JSON object with a 'text' field") from None
    return "\n\n".join(texts)


def _read_hub(dataset: str, split: str) -> str:
    """The hub dataset's rows (``text`` column) joined with blank lines, as the data directory's
    files are rebuilt (:func:`wikitext_text`)."""
    import datasets

    repo, config = HUB[dataset]
    try:
        rows = datasets.load_dataset(repo, config, split=split)["text"]
    except Exception as e:  # network, hub and cache errors of every kind: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{dataset}/{split}: loading {repo} ({config}) from the Hugging Face hub failed "
                        f"({type(e).__name__}: {first}); pass --data-dir DIR / set {DATA_ENV}=DIR, or set "
                        f"HF_HUB_OFFLINE=1 to use the packaged excerpt") from None
    return "\n\n".join(rows)


def tokenize(tokenizer, text: str) -> Tensor:  # type: ignore[no-untyped-def]
    """Token ids of the whole text, tokenized once, as a 1-D tensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.long()


def windows(ids: Tensor, seqlen: int, *, limit: int | None = None, bos: int | None = None) -> Tensor:
    """Non-overlapping windows ``[n, seqlen]`` (the remainder dropped), the first ``limit`` only.

    With ``bos`` every window starts with that token followed by ``seqlen - 1`` text tokens.
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    step = seqlen - (bos is not None)
    n = ids.numel() // step
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    w = ids[: n * step].reshape(n, step)
    if bos is not None:
        w = torch.cat([torch.full((n, 1), bos, dtype=w.dtype), w], dim=1)
    return w


def calibration_windows(ids: Tensor, nsamples: int, seqlen: int, *, seed: int = 0, bos: int | None = None) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, as GPTQ draws them.

    ``random.seed(seed)``, then ``start = random.randint(0, n_tokens - seqlen - 1)`` each.  With
    ``bos`` every window is that token followed by ``seqlen - 1`` text tokens drawn the same way.
    """
    step = seqlen - (bos is not None)
    if ids.numel() <= step + 1:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - step - 1) for _ in range(nsamples)]
    w = torch.stack([ids[s : s + step] for s in starts])
    if bos is not None:
        w = torch.cat([torch.full((len(w), 1), bos, dtype=w.dtype), w], dim=1)
    return w


def tensor_sha256(t: Tensor) -> str:
    """Hash of a tensor's shape, dtype and values: a cache key for the data it holds."""
    h = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def bos_rule(model: object, tokenizer: object) -> int | None:
    """The token every window (and zero-shot context) starts with: BOS for Gemma-family models,
    whose scores collapse without it; None (plain text windows) for the others."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if not model_type.startswith("gemma"):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError(f"a {model_type} model needs a BOS token before every window; its tokenizer has none")
    return int(bos)


def model_windows(model: object, tokenizer: object, dataset: str, split: str, seqlen: int, *,
                  root: str | os.PathLike | None = None, limit: int | None = None, nsamples: int | None = None,
                  seed: int = 0) -> Tensor:
    """The token windows a model is evaluated (consecutive, the first ``limit``) or calibrated
    (``nsamples`` random draws) on, with the model's BOS rule: every window in mixq comes from here."""
    ids = tokenize(tokenizer, load_text(dataset, split, root=root))
    bos = bos_rule(model, tokenizer)
    if nsamples is not None:
        if nsamples < 1:
            raise DataError(f"--nsamples must be positive, got {nsamples}")
        return calibration_windows(ids, nsamples, seqlen, seed=seed, bos=bos)
    return windows(ids, seqlen, limit=limit, bos=bos)
