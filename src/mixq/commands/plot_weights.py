"""``mixq plot-weights``: histograms of chosen layers' original and dequantised weights, and of the error, in one PNG."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mixq.commands.common import add_shared, calibration, load_for, parse_plans, say, setup_run
from mixq.errors import MixqError

NAME = "plot-weights"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from mixq.plots import BINS, MAX_LAYERS

    p = subparsers.add_parser(NAME, help="plot the original and dequantised weights of chosen layers")
    p.add_argument("--plan", required=True, help="one plan file or preset (e.g. int4-g128)")
    p.add_argument("--layer", action="append", required=True, metavar="NAME|re:PATTERN",
                   help="a layer name, or 're:' and a regex matched against whole names (repeatable)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--pool", action="store_true",
                   help=f"one row for all chosen layers together (needed beyond {MAX_LAYERS} layers)")
    p.add_argument("--bins", type=int, default=BINS, help=f"histogram bins (default {BINS})")
    add_shared(p)
    return p


def run(args: argparse.Namespace) -> int:
    from mixq.plots import plot_weights

    run_ = setup_run(args)
    plans = parse_plans([args.plan], args)
    if len(plans) != 1:
        raise MixqError(f"--plan {args.plan!r}: plot-weights takes one plan")
    plan = plans[0][1]
    loaded = load_for(args, run_)
    calib = calibration(args, loaded, [plan])
    result = plot_weights(loaded.model, plan, args.layer, args.out, calibration=calib, pool=args.pool, bins=args.bins,
                          device=run_.device, batch_size=run_.batch_size)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "panels"}
                         | {"panels": [{k: v for k, v in p.items() if k not in ("edges", "error_edges", "counts")}
                                       for p in result["panels"]]}))
    else:
        for p in result["panels"]:
            say(args, f"{', '.join(p['layers'][:3])}{' ...' if len(p['layers']) > 3 else ''}: {', '.join(p['formats'])}, "
                      f"error rms {p['error']['rms']:.4g}, {p['levels_note']}")
        say(args, f"wrote {result['out']} ({result['width']}x{result['height']})")
    return 0
