"""Full WikiText-2 test perplexity of a model and uniform RTN plans, and the speed of the
batched evaluation against the unbatched reference loop, measured in the same process.

    python bench/eval_speed.py --model smollm2-135m --data-dir DATA --out bench/results/eval_speed

Writes OUT.json and OUT.md.  For SmolLM2-135M the base is the dequantised GGUF (Q4_1).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from mixq.data import load_text, tokenize, windows
from mixq.evaluate import perplexity, perplexity_unbatched
from mixq.models import load_model
from mixq.plan import Plan
from mixq.provenance import provenance
from mixq.quantize import quantize_

PLANS = ["int8", "int8-sym", "int6-g128", "int5-g128", "int4-fmin-g32", "int4", "int4-g128", "int4-g32",
         "int3", "int3-g128", "int3-g64", "int3-g32", "int2-g64", "nf4-g64", "mxfp4", "fp8-e4m3", "mxint8"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--out", default="bench/results/eval_speed")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    load_s = time.perf_counter() - t0
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test", root=args.data_dir))
    win = windows(ids, args.seqlen)
    base = loaded.model

    perplexity(base, win[: args.batch_size], batch_size=args.batch_size)  # warm-up (kernels, allocator)
    batched = perplexity(base, win, batch_size=args.batch_size)
    unbatched = perplexity_unbatched(base, win)
    rows = []
    for name in args.plans.split(","):
        plan = Plan.preset(name)
        model = copy.deepcopy(base)
        q = quantize_(model, plan)
        r = perplexity(model, win, batch_size=args.batch_size)
        rep = plan.size_report(base)
        rows.append({"plan": name, "ppl": r.ppl, "bits_per_weight": rep.bits_per_weight, "size_bytes": rep.size_bytes,
                     "quantize_seconds": q.seconds, "eval_seconds": r.seconds,
                     "vs_base_percent": 100 * (r.ppl / batched.ppl - 1)})
        print(f"{name:>14}: ppl {r.ppl:10.3f}  {rep.bits_per_weight:.3f} bpw  ({q.seconds:.1f} s quantize, {r.seconds:.1f} s eval)", flush=True)
        del model
    result = {
        "model": args.model, "dtype": args.dtype, "seqlen": args.seqlen, "windows": len(win), "tokens": batched.tokens,
        "load_seconds": load_s,
        "base": {"ppl": batched.ppl, "batched_seconds": batched.seconds, "batch_size": args.batch_size,
                 "unbatched_ppl": unbatched.ppl, "unbatched_seconds": unbatched.seconds,
                 "speedup": unbatched.seconds / batched.seconds},
        "plans": rows,
        "provenance": provenance(model=loaded.identity(), seed=0, device=device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# Full WikiText-2 test perplexity, {args.model} ({args.dtype}, {result['provenance']['device']})", "",
             f"{len(win)} windows × {args.seqlen} tokens; the base is the GGUF's dequantised weights.", "",
             f"- base ppl **{batched.ppl:.4f}**; batched ({args.batch_size} windows/pass) {batched.seconds:.2f} s, "
             f"unbatched loop {unbatched.seconds:.2f} s (ppl {unbatched.ppl:.4f}): **{result['base']['speedup']:.2f}× faster**", "",
             "| plan (RTN) | ppl | vs base | bits/weight | size (bytes) | quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['ppl']:.3f} | {r['vs_base_percent']:+.2f}% | {r['bits_per_weight']:.4f} | "
                     f"{r['size_bytes']:,} | {r['quantize_seconds']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
