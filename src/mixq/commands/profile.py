"""``mixq profile``: per-layer statistics of the weights and of their inputs on calibration windows (JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixq.commands.common import add_model_options, load_for, provenance_record, say, setup_run
from mixq.errors import MixqError

NAME = "profile"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from mixq.profile import PERCENTILES, SAMPLE_SIZE

    p = subparsers.add_parser(NAME, help="per-layer weight and input statistics (for fraction: profile search spaces)")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.add_argument("--dataset", default="wikitext2", help="text of the input windows (default wikitext2)")
    p.add_argument("--split", default="validation")
    p.add_argument("--weights-only", action="store_true", help="profile the weights only (no forward pass)")
    p.add_argument("--percentiles", default=",".join(f"{x:g}" for x in PERCENTILES),
                   help=f"comma-separated, in [0, 100] (default {','.join(f'{x:g}' for x in PERCENTILES)})")
    p.add_argument("--sample-size", type=int, default=SAMPLE_SIZE,
                   help=f"input elements sampled per layer for the input percentiles (default {SAMPLE_SIZE})")
    add_model_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from mixq.data import model_windows
    from mixq.profile import PROFILE_VERSION, profile_model

    try:
        percentiles = [float(x) for x in args.percentiles.split(",") if x.strip()]
    except ValueError:
        raise MixqError(f"--percentiles {args.percentiles!r}: expected comma-separated numbers") from None
    run_ = setup_run(args)
    loaded = load_for(args, run_)
    windows = None
    if not args.weights_only:
        windows = model_windows(loaded.model, loaded.tokenizer, args.dataset, args.split, args.seqlen,
                                root=args.data_dir, nsamples=args.nsamples, seed=args.seed)
        say(args, f"inputs: {len(windows)} windows x {args.seqlen} tokens from {args.dataset}/{args.split}")
    layers = profile_model(loaded.model, windows, batch_size=run_.batch_size, percentiles=percentiles,
                           sample_size=args.sample_size, seed=args.seed)
    inputs = None if windows is None else {
        "dataset": args.dataset, "split": args.split, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "seed": args.seed, "sample_size": args.sample_size,
        "method": "min, max, mean, std exact over every input element; percentiles from a uniform random sample "
                  "(with replacement) of about sample_size elements per layer"}
    result = {"version": PROFILE_VERSION, "model": args.model, "percentiles": percentiles,
              "weights": "exact statistics of every element", "inputs": inputs, "layers": layers,
              "provenance": provenance_record(args, loaded.identity(), run_.device)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps({"out": str(out), "layers": len(layers), "inputs": inputs}))
    else:
        say(args, f"wrote {out}: {len(layers)} layers")
    return 0
