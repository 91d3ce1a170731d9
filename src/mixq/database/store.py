"""A layer database on disk: safetensors shards of solved weights, indexed by a manifest.

    DIR/manifest.json              the key and every entry (layer, spec, shard, bits, errors)
    DIR/shard-<random>.safetensors the entries' dequantised weights, in the model's dtype

Each shard is self-describing (its metadata holds the key and its entries) and is written to a
temporary file first, then renamed into place; the manifest is rewritten the same way after
every shard.  So an interrupted build, or a full disk, leaves every entry written before it
valid, and the next build adds only what is missing.  A shard that made it to disk but not into
the manifest (a crash between the two, another writer) is taken into the index when the
database is next opened.  Weights are read from the memory-mapped shards (``safe_open``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mixq.database.key import DatabaseError, DatabaseKey, entry_id, solver_options
from mixq.plan import LayerSpec

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.safetensors"
SHARD_BYTES = 256 * 2**20  # entries buffered before a shard is written: what a crash can lose at most


@dataclass(frozen=True)
class Entry:
    """One solved (layer, spec): where its weight is and what it costs."""

    layer: str
    format: str
    solver: str
    options: dict[str, Any]  # every option of the solver
    shard: str  # file name inside the database folder
    shape: tuple[int, ...]
    dtype: str
    bits: int  # exact storage bits (codes, group parameters, outliers)
    loss: float | None  # tr((W-Ŵ) H (W-Ŵ)ᵀ) on the calibration Gram
    rel_error: float | None  # ‖WX − ŴX‖² / ‖WX‖²
    rtn_rel_error: float | None  # the same for round-to-nearest at the same format
    seconds: float  # the solve

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        return cls(**{**d, "shape": tuple(d["shape"])})


def write_shard(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """One shard, whole or not at all: written to a temporary file, then renamed to ``path``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LayerDatabase:
    """The entries of one key in one folder; ``open`` refuses a folder made with another key."""

    def __init__(self, path: Path, key: DatabaseKey, entries: dict[str, Entry]) -> None:
        self.path = path
        self.key = key
        self.entries = entries
        self._handles: dict[str, Any] = {}

    # -- opening ----------------------------------------------------------------
    @staticmethod
    def read_key(path: str | Path) -> DatabaseKey | None:
        """The key recorded in ``path`` (None: no database there yet)."""
        manifest = Path(path) / MANIFEST
        if manifest.is_file():
            return DatabaseKey.from_dict(_read_json(manifest).get("key"))
        for shard in sorted(Path(path).glob(SHARD_GLOB)):
            return DatabaseKey.from_dict(json.loads(_shard_metadata(shard)["key"]))
        return None

    @classmethod
    def open(cls, path: str | Path, key: DatabaseKey) -> LayerDatabase:
        """The database in ``path`` (empty if there is none yet), refused if it was made with another key."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise DatabaseError(f"layer database {path} is not a folder")
        stored = cls.read_key(path)
        if stored is not None and stored != key:
            raise DatabaseError(f"layer database {path} was built for " + "; ".join(stored.differences(key))
                                + ": it is never reused for another model or calibration set; give another --db")
        entries: dict[str, Entry] = {}
        if (path / MANIFEST).is_file():
            entries = {i: Entry.from_dict(e) for i, e in _read_json(path / MANIFEST).get("entries", {}).items()}
            entries = {i: e for i, e in entries.items() if (path / e.shard).is_file()}  # a deleted shard: rebuilt
        db = cls(path, key, entries)
        if db._adopt():
            db._save_manifest()
        return db

    def _adopt(self) -> bool:
        """Index the shards on disk that the manifest does not list; whether any was found."""
        listed = {e.shard for e in self.entries.values()}
        found = False
        for shard in sorted(self.path.glob(SHARD_GLOB)) if self.path.is_dir() else []:
            if shard.name in listed:
                continue
            meta = _shard_metadata(shard)
            if meta.get("key_sha256") != self.key.digest():
                raise DatabaseError(f"layer database {self.path}: shard {shard.name} belongs to another key; remove it")
            for i, e in json.loads(meta["entries"]).items():
                self.entries[i] = Entry.from_dict({**e, "shard": shard.name})
            found = True
        return found

    # -- reading ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, layer: str, spec: LayerSpec) -> Entry | None:
        return self.entries.get(entry_id(layer, spec))

    def missing(self, pairs: Iterable[tuple[str, LayerSpec]]) -> list[tuple[str, LayerSpec]]:
        """The (layer, spec) pairs not in the database, each once, in the order given."""
        out: dict[str, tuple[str, LayerSpec]] = {}
        for layer, spec in pairs:
            i = entry_id(layer, spec)
            if i not in self.entries:
                out.setdefault(i, (layer, spec))
        return list(out.values())

    def weight(self, layer: str, spec: LayerSpec) -> Tensor:
        """The solved weight of (layer, spec), read from its memory-mapped shard (host memory)."""
        i = entry_id(layer, spec)
        e = self.entries.get(i)
        if e is None:
            raise DatabaseError(f"layer database {self.path} has no entry for {layer!r} at {describe(spec)}")
        if e.shard not in self._handles:
            self._handles[e.shard] = safe_open(str(self.path / e.shard), framework="pt", device="cpu")
        return self._handles[e.shard].get_tensor(i)

    def disk_bytes(self) -> int:
        """Bytes of the shards on disk."""
        return sum((self.path / s).stat().st_size for s in {e.shard for e in self.entries.values()})

    # -- writing ----------------------------------------------------------------
    def writer(self, *, shard_bytes: int = SHARD_BYTES) -> ShardWriter:
        return ShardWriter(self, shard_bytes)

    def _save_manifest(self) -> None:
        """Rewrite the manifest with every entry known here and any another writer added meanwhile."""
        manifest = self.path / MANIFEST
        if manifest.is_file():
            for i, e in _read_json(manifest).get("entries", {}).items():
                if i not in self.entries and (self.path / e["shard"]).is_file():
                    self.entries[i] = Entry.from_dict(e)
        _write_json(manifest, {"key": self.key.to_dict(), "entries": {i: e.to_dict() for i, e in self.entries.items()}})


class ShardWriter:
    """Buffers solved entries and writes them a shard at a time (see the module's docstring).

    Used as a context manager: on leaving, what is buffered is written, also after an error
    elsewhere (the work done is kept); an error while writing is a ``DatabaseError`` saying that
    the entries written before it stay valid."""

    def __init__(self, db: LayerDatabase, shard_bytes: int) -> None:
        self.db = db
        self.shard_bytes = shard_bytes
        self.tensors: dict[str, Tensor] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.bytes = 0

    def add(self, layer: str, spec: LayerSpec, weight: Tensor, *, bits: int, loss: float | None,
            rel_error: float | None, rtn_rel_error: float | None, seconds: float) -> None:
        i = entry_id(layer, spec)
        self.tensors[i] = weight.detach().contiguous().cpu()
        self.bytes += weight.numel() * weight.element_size()
        self.pending[i] = {"layer": layer, "format": spec.format.name, "solver": spec.solver,
                           "options": solver_options(spec), "shape": list(weight.shape),
                           "dtype": str(weight.dtype).removeprefix("torch."), "bits": int(bits), "loss": loss,
                           "rel_error": rel_error, "rtn_rel_error": rtn_rel_error, "seconds": seconds}
        if self.bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.tensors:
            return
        db = self.db
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        meta = {"key": json.dumps(db.key.to_dict()), "key_sha256": db.key.digest(), "entries": json.dumps(self.pending)}
        try:
            db.path.mkdir(parents=True, exist_ok=True)
            write_shard(self.tensors, db.path / name, meta)
            for i, e in self.pending.items():
                db.entries[i] = Entry.from_dict({**e, "shard": name})
            db._save_manifest()
        except OSError as e:
            lost = len(self.pending)
            self.tensors, self.pending, self.bytes = {}, {}, 0
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise DatabaseError(f"layer database {db.path}: writing a shard failed ({why}); the {len(db)} entries "
                                f"written before stay valid ({lost} solved ones were lost): make room and run again "
                                "to build only what is missing") from None
        self.tensors, self.pending, self.bytes = {}, {}, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if kind is None:
            self.flush()
            return
        try:
            self.flush()  # keep what was solved before the error
        except DatabaseError:
            pass  # the original error is the one to report


def describe(spec: LayerSpec) -> str:
    opts = ",".join(f"{k}={v}" for k, v in spec.options)
    return f"{spec.format.name} ({spec.solver}{' ' + opts if opts else ''})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DatabaseError(f"layer database manifest {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatabaseError(f"layer database manifest {path} is not a mapping")
    return data


def _shard_metadata(shard: Path) -> dict[str, str]:
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise DatabaseError(f"layer database shard {shard} cannot be read ({type(e).__name__}: {e}); remove it") from None
    if "key" not in meta or "entries" not in meta:
        raise DatabaseError(f"{shard} is not a mixq layer database shard (no key in its metadata); remove it")
    return meta


__all__ = ["Entry", "LayerDatabase", "ShardWriter", "describe", "write_shard"]
