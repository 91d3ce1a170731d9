"""``mixq database``: build a layer database for search spaces (``build``), or describe one (``info``).

The helpers here (the key of this run's calibration set, opening a database by the key recorded
in it, building what is missing with an estimate of its size) serve ``mixq search`` and
``mixq sensitivity`` too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixq.commands.common import (Run, add_model_options, add_solver_options, load_for, say, setup_run,
                                  solver_options)
from mixq.errors import MixqError

NAME = "database"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="build or describe a layer database (each layer solved at each choice of a space)")
    sub = p.add_subparsers(dest="database_command", required=True)
    b = sub.add_parser("build", help="solve every searched layer at every choice of the spaces, on the base model's "
                                     "calibration inputs; only what the database lacks")
    b.add_argument("--space", action="append", default=[], metavar="FILE",
                   help="search space file (repeatable: the union of their entries); default: mixq search's default space")
    b.add_argument("--db", required=True, metavar="DIR", help="the database folder (created, or extended)")
    add_model_options(b)
    add_solver_options(b, calibration=False)
    i = sub.add_parser("info", help="what a layer database holds: its key, and each choice's errors against RTN's")
    i.add_argument("db", metavar="DIR")
    i.add_argument("--json", action="store_true", help="one JSON object: the key and every entry")
    return p


def run(args: argparse.Namespace) -> int:
    return build(args) if args.database_command == "build" else info(args)


def build(args: argparse.Namespace) -> int:
    from mixq.database import LayerDatabase
    from mixq.search import SearchSpace
    from mixq.search.cache import database_entries

    run_ = setup_run(args)
    spaces = [SearchSpace.load(p) for p in args.space] or [SearchSpace()]
    spaces = [s.with_solver(args.solver, solver_options(args)) for s in spaces]
    loaded = load_for(args, run_)
    model = loaded.model
    key, windows = calibration_key(args, loaded, run_)
    db = LayerDatabase.open(args.db, key)
    pairs = [p for s in spaces for p in database_entries(model, s, s.units(model))]
    rep = ensure_entries(args, model, db, pairs, windows, run_)
    record = {"db": str(db.path), "entries": len(db), "built": rep.built, "build_seconds": rep.seconds,
              "disk_bytes": db.disk_bytes(), "key": key.to_dict()}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{db.path}: {len(db)} entries, {record['disk_bytes'] / 1e6:.1f} MB ({rep.built} built in {rep.seconds:.1f} s)")
    return 0


def info(args: argparse.Namespace) -> int:
    from mixq.database import DatabaseError, LayerDatabase

    key = LayerDatabase.read_key(args.db)
    if key is None:
        raise DatabaseError(f"no layer database in {args.db}")
    db = LayerDatabase.open(args.db, key)
    if args.json:
        print(json.dumps({"db": str(db.path), "key": key.to_dict(), "disk_bytes": db.disk_bytes(),
                          "entries": [e.to_dict() for e in db.entries.values()]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    c = key.calibration
    print(f"{db.path}: {len(db)} entries, {db.disk_bytes() / 1e6:.1f} MB; model sha256 {key.model_sha256[:12]}…, "
          f"{key.dtype}, mixq {key.mixq_version}; calibration {c.nsamples} × {c.seqlen} tokens of {c.dataset}/{c.split} "
          f"(seed {c.seed}, batches of {c.batch_size})")
    table = Table(title="per choice, mean over its layers: relative error ‖WX−ŴX‖²/‖WX‖² on the calibration Grams, "
                        "RTN's at the same format, the mean ratio of the two")
    for col in ("choice", "layers", "bits/weight", "error", "RTN's", "ratio", "solve s"):
        table.add_column(col, justify="left" if col == "choice" else "right")
    for row in choice_summary(db):
        choice = " ".join(x for x in (row["format"], row["solver"], row["options"]) if x)
        table.add_row(choice, str(row["layers"]), f"{row['bits_per_weight']:.4f}", f"{row['rel_error']:.3e}",
                      f"{row['rtn_rel_error']:.3e}", f"{row['ratio']:.3f}", f"{row['seconds']:.1f}")
    Console().print(table)
    return 0


def choice_summary(db: Any) -> list[dict[str, Any]]:
    """Per (format, solver, options): layers, bits per weight over them, mean relative error, RTN's,
    the mean of the per-layer ratios, and the solve seconds in all; cheapest first."""
    import dataclasses
    from math import prod

    from mixq.solvers import get_solver

    groups: dict[str, list[Any]] = {}
    for e in db.entries.values():
        groups.setdefault(json.dumps([e.format, e.solver, e.options], sort_keys=True), []).append(e)
    rows = []
    for entries in groups.values():
        e0 = entries[0]
        defaults = dataclasses.asdict(get_solver(e0.solver).options({}))
        changed = ",".join(f"{k}={v}" for k, v in sorted(e0.options.items()) if defaults.get(k) != v)
        ratios = [e.rel_error / e.rtn_rel_error for e in entries if e.rtn_rel_error]
        rows.append({"format": e0.format, "solver": e0.solver, "options": changed, "layers": len(entries),
                     "bits_per_weight": sum(e.bits for e in entries) / sum(prod(e.shape) for e in entries),
                     "rel_error": sum(e.rel_error for e in entries) / len(entries),
                     "rtn_rel_error": sum(e.rtn_rel_error for e in entries) / len(entries),
                     "ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
                     "seconds": sum(e.seconds for e in entries)})
    return sorted(rows, key=lambda r: (r["bits_per_weight"], r["solver"]))


# -- helpers for the commands that read a database -------------------------------------------
def calibration_key(args: argparse.Namespace, loaded: Any, run: Run) -> tuple[Any, Any]:
    """(the database key of this run's calibration set, its windows): --calib-dataset, --calib-split,
    --nsamples, --seqlen, --seed, --batch-size and --dtype."""
    from mixq.data import model_windows

    windows = model_windows(loaded.model, loaded.tokenizer, args.calib_dataset, args.calib_split, args.seqlen,
                            root=args.data_dir, nsamples=args.nsamples, seed=args.seed)
    return _key(loaded, run.dtype, args.calib_dataset, args.calib_split, args.nsamples, args.seqlen, args.seed,
                run.batch_size, windows), windows


def open_recorded(path: str | Path, loaded: Any, dtype: str, data_dir: str | None) -> tuple[Any, Any]:
    """(the database in ``path`` with the calibration set recorded in it, that set's windows),
    refused if it was built for another model, dtype or mixq, or if the calibration text changed."""
    from mixq.data import model_windows
    from mixq.database import DatabaseError, LayerDatabase

    recorded = LayerDatabase.read_key(path)
    if recorded is None:
        raise DatabaseError(f"no layer database in {path}: build one first (mixq database build --db {path} ...)")
    c = recorded.calibration
    windows = model_windows(loaded.model, loaded.tokenizer, c.dataset, c.split, c.seqlen, root=data_dir,
                            nsamples=c.nsamples, seed=c.seed)
    key = _key(loaded, dtype, c.dataset, c.split, c.nsamples, c.seqlen, c.seed, c.batch_size, windows)
    return LayerDatabase.open(path, key), windows


def _key(loaded: Any, dtype: str, dataset: str, split: str, nsamples: int, seqlen: int, seed: int, batch_size: int,
         windows: Any) -> Any:
    from mixq.data import tensor_sha256
    from mixq.database import CalibrationSet, DatabaseKey

    calibration = CalibrationSet(dataset, split, nsamples, seqlen, seed, tensor_sha256(windows), batch_size)
    return DatabaseKey.of(loaded.identity()["sha256"], dtype, calibration)


def ensure_entries(args: argparse.Namespace, model: Any, db: Any, pairs: list[Any], windows: Any, run: Run) -> Any:
    """Build the entries of ``pairs`` that ``db`` lacks, saying first how many and about how large."""
    from mixq.database import build_database, estimate_bytes

    missing = db.missing(pairs)
    if missing:
        say(args, f"layer database {db.path}: building {len(missing)} entries ({len(db)} there already), "
                  f"about {estimate_bytes(model, missing) / 1e6:.1f} MB on disk")
    rep = build_database(model, db, missing, windows, batch_size=run.batch_size, device=run.device,
                         progress=not getattr(args, "json", False))
    if rep.built:
        say(args, f"layer database: {rep.built} entries in {rep.seconds:.1f} s, {db.disk_bytes() / 1e6:.1f} MB on disk")
    return rep


__all__ = ["calibration_key", "choice_summary", "ensure_entries", "open_recorded"]
