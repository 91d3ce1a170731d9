"""Whole-model calibrated quantization of a model: perplexity, exact bits per weight and
quantization time for each (format, solver, options) setting, on the full WikiText-2 test.

    python bench/solvers.py --model M --data-dir DATA --settings int4-g128:rtn,int4-g128:gptq \\
        --out bench/results/solvers

A setting is FORMAT:SOLVER[:KEY=VALUE;KEY=VALUE]: the solver's options, and ``seed`` (the
calibration draw), ``true_sequential`` and ``fused`` (false: the eager column loops rather
than the Triton sweeps, for a same-process comparison).  Calibration: NSAMPLES windows of SEQLEN
tokens from the validation split drawn as GPTQ draws them (random.seed(0), randint).
Each finished setting is appended to OUT.jsonl at once; OUT.md holds the table.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import json
import time
from pathlib import Path

import torch
import yaml

from mixq.data import calibration_windows, load_text, tokenize, windows
from mixq.evaluate import perplexity
from mixq.models import load_model
from mixq.plan import Plan
from mixq.provenance import provenance
from mixq.quantize import quantize_

DEFAULT = ("int4:rtn,int4:gptq,int4-g128:rtn,int4-g128:gptq,int4-g128:gptq:act_order=true;static_groups=true,"
           "int4-g32:rtn,int4-g32:gptq,int3:rtn,int3:gptq,int3-g128:rtn,int3-g128:gptq,"
           "int3-g128:gptq:act_order=true;static_groups=true,int3-g64:rtn,int3-g64:gptq,int3-g32:rtn,int3-g32:gptq,"
           "int2-g64:rtn,int2-g64:gptq")


def parse_setting(text: str) -> tuple[str, str, dict]:
    parts = text.split(":")
    opts = {}
    if len(parts) > 2:
        for kv in parts[2].split(";"):
            k, v = kv.split("=", 1)
            opts[k] = yaml.safe_load(v)
    return parts[0], parts[1], opts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--settings", default=DEFAULT)
    ap.add_argument("--out", default="bench/results/solvers")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N test windows (default: all)")
    ap.add_argument("--profile", default="", metavar="SETTINGS",
                    help="settings (as written in --settings) to run under cProfile, into OUT.profile.txt; their "
                         "times include the profiler's overhead (the row says profiled)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    test = windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen,
                   limit=args.eval_limit)
    val = tokenize(loaded.tokenizer, load_text("wikitext2", "validation", root=args.data_dir))
    base = loaded.model
    base_ppl = perplexity(base, test, batch_size=args.batch_size).ppl
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"base ppl {base_ppl:.4f}", flush=True)
    for text in args.settings.split(","):
        fmt, solver, opts = parse_setting(text)
        true_sequential = opts.pop("true_sequential", True)
        seed = opts.pop("seed", 0)  # calibration draw
        fused = opts.pop("fused", True)  # false: the eager column loops instead of the Triton sweeps
        os.environ["MIXQ_FUSED_SWEEPS"] = "1" if fused else "0"
        calib = calibration_windows(val, args.nsamples, args.seqlen, seed=seed)
        plan = Plan.uniform(fmt, solver, **opts)
        model = copy.deepcopy(base)
        if device == "cuda":
            torch.cuda.synchronize()
        profiler = cProfile.Profile() if text in args.profile.split(",") else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        q = quantize_(model, plan, calibration=None if solver == "rtn" else calib, device=device,
                      batch_size=args.batch_size, true_sequential=true_sequential)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        if profiler:
            profiler.disable()
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(30)
            with out.with_suffix(".profile.txt").open("a") as fh:
                fh.write(f"## {text} ({seconds:.1f} s)\n{buf.getvalue()}\n")
        ppl = perplexity(model, test, batch_size=args.batch_size).ppl
        rep = plan.size_report(base)
        row = {"setting": text, "format": fmt, "solver": solver, "options": opts, "true_sequential": true_sequential,
               "seed": seed, "fused": fused, "profiled": profiler is not None, "ppl": ppl,
               "bits_per_weight": rep.bits_per_weight, "size_bytes": rep.size_bytes, "quantize_seconds": seconds}
        rows.append(row)
        with out.with_suffix(".jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{text:>55}: ppl {ppl:10.3f}  {rep.bits_per_weight:.4f} bpw  {seconds:7.1f} s", flush=True)
        del model, q
    meta = {"model": args.model, "dtype": args.dtype, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "base_ppl": base_ppl, "provenance": provenance(model=loaded.identity(), seed=0, device=device)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# Calibrated solvers, {args.model} ({args.dtype}, {meta['provenance']['device']})", "",
             f"Full WikiText-2 test at {args.seqlen} ({len(test)} windows); calibration {args.nsamples} × {args.seqlen} "
             f"from the validation split; base ppl {base_ppl:.4f} (the GGUF's dequantised weights).", "",
             "| format | solver | options | ppl | bits/weight | quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        o = ", ".join([f"{k}={v}" for k, v in r["options"].items()] + ([] if r["true_sequential"] else ["not true-sequential"]) + ([f"calibration seed {r['seed']}"] if r["seed"] else []))
        lines.append(f"| {r['format']} | {r['solver']} | {o} | {r['ppl']:.3f} | {r['bits_per_weight']:.4f} | {r['quantize_seconds']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
