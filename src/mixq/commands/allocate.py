"""``mixq allocate``: a plan from sensitivity scores and a budget (greedy, then exchanges)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from mixq.commands.common import parse_size
from mixq.errors import MixqError

NAME = "allocate"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    al = subparsers.add_parser("allocate", help="a plan from sensitivity scores and a budget")
    al.add_argument("--sens", required=True)
    al.add_argument("--max-bits", type=float, default=None)
    al.add_argument("--max-size", default=None)
    al.add_argument("--out", required=True, help="plan file (.yaml or .json)")
    al.add_argument("--starts", type=int, default=1, help="also write N-1 randomised variants (OUT-1.yaml, ...)")
    al.add_argument("--seed", type=int, default=0)
    return al


def run(args: argparse.Namespace) -> int:
    from mixq.sensitivity.allocate import JITTER, allocate, choice_specs, plan_of
    from mixq.solvers import get_solver

    path = Path(args.sens)
    if not path.is_file():
        raise MixqError(f"sensitivity file not found: {path}")
    sens = json.loads(path.read_text())
    max_size = None if args.max_size is None else parse_size(args.max_size)
    out = Path(args.out)
    specs = choice_specs(sens)
    database = (sens.get("meta") or {}).get("database")
    calibrated = any(get_solver(s.solver).needs_calibration for s in specs.values())
    header = ""
    if database is not None and calibrated:  # scored on a layer database's solutions: independent calibration
        from mixq.database import DatabaseKey

        key = DatabaseKey.from_dict(database)
        header = (f"# scored on layer-database weights: reproduce with --calibration-mode independent "
                  f"{key.calibration.flags()} --dtype {key.dtype}\n")
    for k in range(max(args.starts, 1)):
        choice = allocate(sens, max_bits=args.max_bits, max_size=max_size, jitter=0.0 if k == 0 else JITTER,
                          seed=args.seed + k)
        target = out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        plan = plan_of(choice, specs)
        plan.save(target)
        if header and target.suffix != ".json":
            target.write_text(header + target.read_text())
        params = sum(d["params"] for d in sens["layers"].values())
        bits = sum(sens["layers"][n]["bits"][f] for n, f in choice.items())
        print(f"{target}: {bits / params:.4f} bits/weight, {math.ceil((bits + sens['other_bits']) / 8):,} bytes"
              + (f" ({header[2:].strip()})" if header else ""))
    return 0
