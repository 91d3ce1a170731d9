"""``mixq generate``: each plan's text for one prompt, side by side, and the base model's
perplexity of it (the fourth seed's comparison of absmax and zero-point GPT-2)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mixq.commands.common import (add_shared, calibration, calibration_record, load_for, parse_plans,
                                  provenance_record, say, setup_run)

NAME = "generate"
PROMPT = "I have a dream"  # the fourth seed's prompt


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from mixq.evaluate.generate import TOP_K

    p = subparsers.add_parser(NAME, help="generate text with each plan and score it under the base model")
    p.add_argument("--plan", action="append", default=None,
                   help="plan file or preset; repeat or comma-separate to compare several (base = unquantized)")
    p.add_argument("--prompt", default=PROMPT, help=f"the prompt (default {PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50; fewer at EOS)")
    p.add_argument("--sample", action="store_true", help="top-k sampling seeded with --seed (default: greedy)")
    p.add_argument("--top-k", type=int, default=TOP_K, help=f"with --sample: keep the k most likely tokens (default {TOP_K})")
    p.add_argument("--score-prompt", action="store_true",
                   help="score the prompt's tokens too (after the first), as the fourth seed does; default: only the "
                        "generated tokens, given the prompt")
    add_shared(p)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from mixq.data import bos_rule, tokenize
    from mixq.evaluate.generate import Decoding, generate_ids, text_perplexity
    from mixq.quantize import quantized_copy

    decoding = Decoding(max_new_tokens=args.max_new_tokens, sample=args.sample, top_k=args.top_k, seed=args.seed)
    run_ = setup_run(args)
    plans = parse_plans(args.plan, args)
    loaded = load_for(args, run_)
    base, tokenizer = loaded.model, loaded.tokenizer
    for _, plan in plans:
        plan.size_report(base)  # refuse a bad plan before generating anything
    calib = calibration(args, loaded, [p for _, p in plans])
    bos = bos_rule(base, tokenizer)
    prompt = tokenize(tokenizer, args.prompt)
    if bos is not None:
        prompt = torch.cat([torch.tensor([bos]), prompt])
    rows = []
    for label, plan in plans:
        with quantized_copy(base, plan, calibration=calib, device=run_.device, batch_size=run_.batch_size,
                            progress=not args.json, log=lambda m: say(args, m)) as (model, q):
            new = generate_ids(model, prompt, decoding, eos=tokenizer.eos_token_id)
        report = plan.size_report(base)
        rows.append({"label": label, "plan": plan.describe(),
                     "text": tokenizer.decode(torch.cat([prompt, new]).tolist(), skip_special_tokens=True),
                     "continuation": tokenizer.decode(new.tolist(), skip_special_tokens=True),
                     "new_tokens": new.tolist(),
                     "base_ppl": text_perplexity(base, prompt, new, score_prompt=args.score_prompt),
                     "bits_per_weight": report.bits_per_weight, "size_bytes": report.size_bytes,
                     "calibration": calibration_record(args, calib) if q else None})
        say(args, f"{label}: {len(new)} tokens, base perplexity {rows[-1]['base_ppl']:.2f}")
    scored = ("every token after the first, prompt included (as the fourth seed)" if args.score_prompt
              else "the generated tokens given the prompt")
    result = {"model": args.model, "prompt": args.prompt, "prompt_tokens": prompt.tolist(),
              "decoding": decoding.describe(), "scored": f"perplexity under the base model of {scored}",
              "rows": rows, "provenance": provenance_record(args, loaded.identity(), run_.device)}
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        table(result)
    return 0


def table(result: dict[str, Any]) -> None:
    """The plans side by side: one column each."""
    from rich.console import Console
    from rich.table import Table

    d = result["decoding"]
    how = "greedy" if d["mode"] == "greedy" else f"top-{d['top_k']} sampling, seed {d['seed']}"
    out = Table(title=f"{result['model']} · {how} · up to {d['max_new_tokens']} new tokens", show_lines=True)
    out.add_column("")
    for r in result["rows"]:
        out.add_column(r["label"], ratio=1)
    rows = result["rows"]
    out.add_row("text", *[r["text"] for r in rows])
    out.add_row("new tokens", *[str(len(r["new_tokens"])) for r in rows])
    out.add_row("base ppl", *[f"{r['base_ppl']:.2f}" for r in rows])
    out.add_row("bits/weight", *[f"{r['bits_per_weight']:.3f}" for r in rows])
    console = Console()
    console.print(out)
    console.print(f"base ppl: {result['scored']}")
