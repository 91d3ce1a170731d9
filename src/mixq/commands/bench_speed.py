"""``mixq bench-speed``: decode and prefill speed of plans on low-bit kernels, against the 16-bit base."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mixq.errors import MixqError
from mixq.models import DEFAULT_MODEL, DTYPES

NAME = "bench-speed"
DEFAULT_PLANS = "base,int8,int4-g128"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from mixq.runtime import BACKENDS
    from mixq.runtime.speed import SHAPES

    p = subparsers.add_parser(NAME, help="decode/prefill tokens/s and peak memory of plans on low-bit kernels (CUDA)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help=f"named model, .gguf file or Hugging Face folder (default {DEFAULT_MODEL})")
    src.add_argument("--random-weights", default=None, choices=sorted(SHAPES), metavar="SHAPE",
                     help=f"a model of this shape with random weights, built on the device ({', '.join(sorted(SHAPES))})")
    p.add_argument("--layers", type=int, default=None, help="with --random-weights: only the first N blocks")
    p.add_argument("--plan", default=DEFAULT_PLANS,
                   help=f"comma-separated presets or plan files, solved with RTN (default {DEFAULT_PLANS}; base = 16-bit)")
    p.add_argument("--batch", default="1,16", help="decode batch sizes (default 1,16)")
    p.add_argument("--new-tokens", type=int, default=128, help="timed decode steps per batch size (default 128)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding (default 32)")
    p.add_argument("--prefill", type=int, default=2048, help="prefill length timed (default 2048; 0 skips it)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel library (default auto: tinygemm for int4, gemlite where installed)")
    p.add_argument("--kernels", default="optional", choices=["optional", "required"],
                   help="required: refuse a plan with layers no kernel serves (they list in the error)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (captured in a CUDA graph either way)")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graph: every step launches its kernels")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run (fake-quant, no kernels)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)
    return p


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MixqError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise MixqError(f"{flag} {text!r}: expected positive integers")
    return values


def _check(args: argparse.Namespace) -> tuple[torch.device, tuple[int, ...], list[str]]:
    batches = _ints(args.batch, "--batch")
    for flag, value, low in (("--new-tokens", args.new_tokens, 1), ("--prompt", args.prompt, 1), ("--prefill", args.prefill, 0)):
        if value < low:
            raise MixqError(f"{flag} must be at least {low}, got {value}")
    if args.layers is not None and args.random_weights is None:
        raise MixqError("--layers applies to --random-weights only")
    plans = [p.strip() for p in args.plan.split(",") if p.strip()]
    if not plans:
        raise MixqError("--plan is empty")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MixqError("bench-speed measures GPU speed and no CUDA device is visible (--device cpu for a smoke run)")
    if device.type == "cpu":
        if args.kernels == "required":
            raise MixqError("--kernels required needs CUDA: on cpu every layer stays fake-quant")
        if not args.no_graphs:
            raise MixqError("--device cpu runs without CUDA graphs: add --no-graphs")
    return device, batches, plans


def _say(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def table(rows: list[dict[str, Any]], batches: tuple[int, ...]) -> str:
    base = next((r for r in rows if r["plan"] in ("base", "bf16", "fp16", "none")), None)
    head = ["plan", "bits/w"] + [f"decode b{b} tok/s" for b in batches] + ["prefill tok/s", "peak GiB", "kernels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["plan"], f"{r['bits_per_weight']:.2f}"]
        for b in batches:
            tps = r["decode"][str(b)]["tokens_per_s"]
            ratio = f" ({tps / base['decode'][str(b)]['tokens_per_s']:.2f}x)" if base is not None else ""
            cells.append(f"{tps:.1f}{ratio}")
        cells.append("-" if not r["prefill"] else f"{r['prefill']['tokens_per_s']:.0f}")
        cells.append("-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}")
        k = r["kernels"]
        cells.append("-" if k is None else ", ".join(f"{n} {c}" for n, c in k["kernels"].items()) +
                     (f"; {len(k['fallback'])} fake-quant" if k["fallback"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from mixq.plan import Plan
    from mixq.provenance import provenance
    from mixq.runtime.speed import plan_speed, random_model

    device, batches, names = _check(args)
    plans = [(n, Plan.parse(n)) for n in names]  # a bad plan is refused before the model loads
    dtype = DTYPES[args.dtype]
    if args.random_weights:
        _say(args, f"building {args.random_weights} with random weights on {device}")
        base = random_model(args.random_weights, device=device, dtype=dtype, layers=args.layers)
        identity = {"name": f"random:{args.random_weights}", "layers": str(base.config.num_hidden_layers)}
    else:
        from mixq.models import load_model

        loaded = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype, device=str(device))
        base, identity = loaded.model, {"name": loaded.source.name, "path": str(loaded.source.path)}
    rows = []
    for i, (name, plan) in enumerate(plans):
        _say(args, f"[{i + 1}/{len(plans)}] {name}")
        model = base if i == len(plans) - 1 else copy.deepcopy(base)  # the last plan may consume the base
        row = plan_speed(model, plan, batches=batches, prompt=args.prompt, steps=args.new_tokens, prefill=args.prefill,
                         backend=args.backend, required=args.kernels == "required", graphs=not args.no_graphs,
                         compile=args.compile, log=lambda m: _say(args, m))
        rows.append({"plan": name, **row})
        del model
    result = {
        "model": identity, "dtype": args.dtype, "batches": list(batches), "prompt": args.prompt,
        "new_tokens": args.new_tokens, "prefill": args.prefill, "backend": args.backend,
        "graphs": not args.no_graphs, "compile": args.compile, "rows": rows,
        "provenance": provenance(model=identity, seed=0, device=device),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    else:
        print(table(rows, batches))
    return 0
