"""Atomic folder writes: everything goes into a temporary folder beside the target, which
is renamed onto it only once every file is written.

A failure part-way (a full disk, an error, an interrupt) removes the temporary folder and
leaves the target as it was; a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixq.errors import ExportError


def check_target(target: str | os.PathLike, *, overwrite: bool) -> Path:
    """The target folder, refused when it is a file or a non-empty folder (unless ``overwrite``)."""
    path = Path(target)
    if path.is_file() or path.is_symlink():
        raise ExportError(f"{path} exists and is not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(f"{path} exists and is not empty; pass --overwrite to replace it")
    return path


@contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target``, on any failure it is removed."""
    path = check_target(target, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, path, tag)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"writing {path} failed ({e.strerror or e}); nothing was written") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, path: Path, tag: str) -> None:
    """Rename ``tmp`` onto ``path``; an existing ``path`` is moved aside first and removed after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{tag}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old, path)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)
