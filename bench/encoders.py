"""Sentence-embedding drift of a quantized encoder (all-MiniLM-L6-v2) against its base, on CPU.

    python bench/encoders.py --data-dir DATA --out bench/results/minilm_cpu

For each setting: quantize a copy of the model, embed the first LIMIT sentences of the
WikiText-2 test split (mean pooling, L2-normalised, at most 256 tokens: the model's
sentence-transformers configuration), and compare with the base's embeddings: mean and
minimum cosine similarity, and top-1 agreement (the fraction of sentences whose nearest
neighbour among the others is unchanged).  Calibrated solvers see NSAMPLES sentences of
the validation split drawn with ``random.Random(SEED).sample``.  A setting is PLAN:SOLVER
(a preset or a plan file; SOLVER ``plan`` keeps the file's solvers).  Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from mixq.data import load_text  # noqa: E402
from mixq.evaluate.embeddings import (Pooling, compare, encode, max_length_of, sample_sentences,  # noqa: E402
                                      sentence_batch, text_sentences)
from mixq.models import load_encoder  # noqa: E402
from mixq.plan import Plan  # noqa: E402
from mixq.provenance import provenance  # noqa: E402
from mixq.quantize import quantize_  # noqa: E402

DEFAULT = ("base:rtn,int8:rtn,int4-g128:rtn,int4-g128:gptq,int3-g128:rtn,int3-g128:gptq,"
           "bench/plans/minilm_attn4_ffn3.yaml:plan,bench/plans/minilm_attn3_ffn4.yaml:plan,"
           "bench/plans/minilm_int4_emb8.yaml:plan")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def plan_of(setting: str) -> tuple[str, Plan]:
    text, solver = setting.rsplit(":", 1)
    plan = Plan.parse(text)
    label = Path(text).stem if Path(text).suffix else text
    if solver != "plan":
        plan = plan.with_solver(solver)
        label = label if solver == "rtn" else f"{label} {solver}"
    return label, plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=1000, help="test sentences embedded")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration sentences")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=DEFAULT)
    ap.add_argument("--out", default="bench/results/minilm_cpu")
    args = ap.parse_args()
    command = shlex.join(["python", "bench/encoders.py", *sys.argv[1:]])
    torch.manual_seed(args.seed)
    loaded = load_encoder(args.model, dtype="float32", device="cpu")
    base = loaded.model
    pooling = Pooling.from_folder(loaded.source.path)
    length = max_length_of(base, pooling)
    settings = [plan_of(s) for s in args.settings.split(",") if s.strip()]
    for _, plan in settings:
        plan.size_report(base)  # a bad plan fails before any work
    sentences = text_sentences(load_text("wikitext2", "test", root=args.data_dir), limit=args.limit)
    pool = text_sentences(load_text("wikitext2", "validation", root=args.data_dir))
    calib = sentence_batch(loaded.tokenizer, sample_sentences(pool, args.nsamples, seed=args.seed), max_length=length)
    start = time.perf_counter()
    ref = encode(base, loaded.tokenizer, sentences, pooling=pooling, batch_size=args.batch_size, max_length=length)
    embed_seconds = time.perf_counter() - start
    print(f"{len(sentences)} sentences embedded in {embed_seconds:.1f} s", flush=True)
    rows = []
    for label, plan in settings:
        model = base if not plan.resolve(base) else copy.deepcopy(base)
        seconds = 0.0
        if model is not base:
            result = quantize_(model, plan, calibration=calib if plan.needs_calibration() else None,
                               batch_size=args.batch_size)
            seconds = result.seconds
        emb = ref if model is base else encode(model, loaded.tokenizer, sentences, pooling=pooling,
                                               batch_size=args.batch_size, max_length=length)
        report = plan.size_report(base)
        row = {"label": label, "plan": plan.to_dict(), **compare(ref, emb).to_dict(),
               "bits_per_weight": report.bits_per_weight, "size_bytes": report.size_bytes,
               "quantize_seconds": seconds, "calibrated": plan.needs_calibration()}
        rows.append(row)
        print(f"{label}: mean cos {row['mean_cosine']:.5f} min {row['min_cosine']:.4f} top-1 {row['top1_agreement']:.3f} "
              f"{row['bits_per_weight']:.3f} bits/weight {row['size_bytes'] / 1e6:.2f} MB {seconds:.1f} s", flush=True)
        del model
    hardware = cpu_model()
    meta = {"command": command, "hardware": f"{hardware}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
            "model": loaded.identity(), "pooling": pooling.to_dict(), "max_length": length,
            "sentences": len(sentences), "test": "wikitext2/test: first LIMIT distinct sentences of 4+ words",
            "calibration": {"split": "wikitext2/validation", "sentences": args.nsamples, "seed": args.seed,
                            "tokens": int(calib["attention_mask"].sum())},
            "base_embed_seconds": embed_seconds,
            "provenance": provenance(model=loaded.identity(), seed=args.seed, device="cpu", command=command)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Sentence-embedding drift of quantized all-MiniLM-L6-v2 on CPU ({meta['date']})", "",
             f"Command: `{meta['command']}` on {meta['hardware']} (fp32, a shared machine: times are indicative). "
             f"{meta['sentences']} sentences of the WikiText-2 test split embedded as sentence-transformers does "
             f"(mean pooling over the attention mask, L2-normalised, at most {meta['max_length']} tokens); "
             f"every row is compared with the unquantized model's embeddings of the same sentences. "
             f"Top-1 agreement: the fraction of sentences whose nearest neighbour (cosine, among the other "
             f"sentences) is unchanged. GPTQ calibration: {meta['calibration']['sentences']} sentences "
             f"({meta['calibration']['tokens']} tokens) of the validation split, padding left out of the Grams. "
             "Bits/weight averages the quantized tensors with every scale and zero point; size counts every "
             "parameter left unquantized at 16 bits (the 11.7M-parameter word embedding, unless a plan names it). "
             "Plan files: `bench/plans/`. Raw rows: the .json beside this file.",
             "", "| plan | mean cos | min cos | top-1 agree | bits/weight | size (MB) | quantize s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.4f} | {r['top1_agreement']:.3f} | "
                     f"{r['bits_per_weight']:.3f} | {r['size_bytes'] / 1e6:.2f} | {r['quantize_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
