"""``mixq embed-eval``: quantize an encoder with each plan and compare its sentence embeddings to the base's."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mixq.commands.common import add_device_options, add_solver_options, parse_plans, provenance_record, say, setup_run
from mixq.errors import MixqError
from mixq.models import DEFAULT_ENCODER

NAME = "embed-eval"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``embed-eval`` on the CLI's subparsers."""
    p = subparsers.add_parser(NAME, help="quantize an encoder and compare its sentence embeddings to the base's")
    p.add_argument("--model", default=DEFAULT_ENCODER,
                   help=f"named encoder ({DEFAULT_ENCODER}) or a Hugging Face / sentence-transformers folder")
    p.add_argument("--plan", action="append", default=None,
                   help="plan file or preset; repeat or comma-separate to compare several (base = unquantized)")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, or a .txt/.jsonl file")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=1000, help="sentences to embed (the first N; default 1000)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sentence at most (default: the model's, 256 for MiniLM)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sentences (calibrated solvers; default 128)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $MIXQ_DATA_DIR)")
    g = p.add_argument_group("device")
    add_device_options(g, batch_default=32, batch_help="sentences per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per plan on stdout")
    add_solver_options(p, calibration=False)
    return p


def run(args: argparse.Namespace) -> int:
    from mixq.data import load_text
    from mixq.evaluate.embeddings import (Pooling, compare, encode, max_length_of, sample_sentences, sentence_batch,
                                          text_sentences)
    from mixq.models import load_encoder, resolve_model
    from mixq.quantize import quantized_copy

    pooling = Pooling.from_folder(resolve_model(args.model).path)
    seqlen = args.seqlen if args.seqlen is not None else pooling.max_length or 512
    run_ = setup_run(args)
    device, dtype = run_.device, run_.dtype
    plans = parse_plans(args.plan, args)
    sentences = text_sentences(load_text(args.dataset, args.split, root=args.data_dir), limit=args.limit)
    if len(sentences) < 2:
        raise MixqError(f"{args.dataset}/{args.split} gives {len(sentences)} sentence(s); at least two are needed")
    say(args, f"loading {args.model} ({dtype}, {device})")
    loaded = load_encoder(args.model, dtype=dtype, device=device)
    base = loaded.model
    for _, plan in plans:
        plan.size_report(base)  # refuse a bad plan before any work
    length = min(seqlen, max_length_of(base, pooling))
    calib, calib_record = None, None
    if any(p.needs_calibration() for _, p in plans):
        if args.nsamples < 1:
            raise MixqError(f"--nsamples must be positive, got {args.nsamples}")
        pool = text_sentences(load_text(args.calib_dataset, args.calib_split, root=args.data_dir))
        calib = sentence_batch(loaded.tokenizer, sample_sentences(pool, args.nsamples, seed=args.seed), max_length=length)
        calib_record = {"dataset": args.calib_dataset, "split": args.calib_split, "sentences": args.nsamples,
                        "tokens": int(calib["attention_mask"].sum()), "max_length": length, "seed": args.seed,
                        "mode": "sequential: each block sees the outputs of the quantized blocks before it; padding left out"}
        say(args, f"calibration: {args.nsamples} sentences ({calib_record['tokens']} tokens) "
                  f"from {args.calib_dataset}/{args.calib_split} (seed {args.seed})")
    say(args, f"embedding {len(sentences)} sentences of {args.dataset}/{args.split} "
              f"({pooling.mode} pooling{', normalised' if pooling.normalize else ''}, at most {length} tokens)")
    ref = encode(base, loaded.tokenizer, sentences, pooling=pooling, batch_size=args.batch_size, max_length=length)
    prov = provenance_record(args, loaded.identity(), device)
    rows = []
    for label, plan in plans:
        with quantized_copy(base, plan, calibration=calib, device=device, batch_size=args.batch_size,
                            progress=not args.json, log=lambda m: say(args, m)) as (model, q):
            emb = ref if model is base else encode(model, loaded.tokenizer, sentences, pooling=pooling,
                                                   batch_size=args.batch_size, max_length=length)
        drift = compare(ref, emb)
        report = plan.size_report(base)
        row: dict[str, Any] = {"label": label, "plan": plan.describe(), **drift.to_dict(),
                               "bits_per_weight": report.bits_per_weight, "size_bytes": report.size_bytes,
                               "quantized_layers": report.layers, "dataset": args.dataset, "split": args.split,
                               "max_length": length, "pooling": pooling.to_dict(),
                               "quantize_seconds": q.seconds if q else 0.0, "size": report.to_dict(),
                               "calibration": calib_record if q else None, "provenance": prov}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            say(args, f"{label}: mean cosine {drift.mean_cosine:.5f}, top-1 agreement {drift.top1_agreement:.3f}, "
                      f"{report.bits_per_weight:.3f} bits/weight, {report.size_bytes:,} bytes")
    if not args.json:
        _table(rows, args)
    return 0


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model} · {args.dataset}/{args.split} · {rows[0]['sentences']} sentences")
    for col in ("plan", "mean cos", "min cos", "top-1 agree", "bits/weight", "size (MB)"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in rows:
        table.add_row(r["label"], f"{r['mean_cosine']:.5f}", f"{r['min_cosine']:.4f}", f"{r['top1_agreement']:.3f}",
                      f"{r['bits_per_weight']:.3f}", f"{r['size_bytes'] / 1e6:.2f}")
    Console().print(table)
