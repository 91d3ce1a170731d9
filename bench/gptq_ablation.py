"""Where GPTQ's 4-bit solution helps or hurts: solve the whole model with RTN, GPTQ and
QuantEase, then score hybrids that take one solver's weights for some layers and RTN's for
the rest.

    python bench/gptq_ablation.py --data-dir DATA --format int4 --blocks --out bench/results/gptq_ablation_cpu.json

Rows: every layer from one solver (``--solvers``, RTN first); each other solver in one kind of
layer only (q/k/v, o, gate/up, down), RTN elsewhere; with ``--blocks``, GPTQ in one block
only, RTN elsewhere.
Calibration: NSAMPLES × SEQLEN validation windows, true-sequential; scored on the first
LIMIT test windows of SEQLEN tokens (all rows on the same windows).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from mixq.data import calibration_windows, load_text, tokenize, windows
from mixq.evaluate import perplexity
from mixq.models import load_model, quantizable_layers
from mixq.plan import Plan
from mixq.provenance import provenance
from mixq.quantize import quantize_

KINDS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def solved(base, fmt: str, solver: str, calib, batch: int, iterations: int) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    opts = {"iterations": iterations} if "quantease" in solver else {}
    if solver == "gptq-act":  # act-order: the loudest input features first
        solver, opts = "gptq", {"act_order": True, "static_groups": True}
    quantize_(model, Plan.uniform(fmt, solver, **opts), calibration=None if solver == "rtn" else calib,
              batch_size=batch)
    return {n: m.weight.detach().clone() for n, m in quantizable_layers(model).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=30, help="QuantEase sweeps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--solvers", default="rtn,gptq,quantease", help="rtn first; gptq-act is GPTQ with act-order")
    ap.add_argument("--blocks", action="store_true", help="also GPTQ in one block at a time")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    val = tokenize(tok, load_text("wikitext2", "validation", root=args.data_dir))
    test = windows(tokenize(tok, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen, limit=args.limit)
    calib = calibration_windows(val, args.nsamples, args.seqlen, seed=0)
    t = time.perf_counter()
    names = args.solvers.split(",")
    sols = {s: solved(base, args.format, s, calib, args.batch_size, args.iterations) for s in names}
    print(f"solved in {time.perf_counter() - t:.0f} s", flush=True)
    layers = quantizable_layers(base)
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    rows = []

    def score(label: str, pick) -> None:  # pick(layer name) -> solver
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(sols[pick(n)][n])
        ppl = perplexity(base, test, batch_size=args.batch_size).ppl
        rows.append({"label": label, "ppl": ppl})
        print(f"{label:>40}: {ppl:9.3f}", flush=True)

    base_ppl = perplexity(base, test, batch_size=args.batch_size).ppl
    print(f"{'base':>40}: {base_ppl:9.3f}", flush=True)
    for s in sols:
        score(f"all {s}", lambda n, s=s: s)
    for s in names[1:]:
        for kind, kind_layers in KINDS.items():
            score(f"{s} in {kind} only", lambda n, s=s, k=kind_layers: s if n.rsplit(".", 1)[-1] in k else "rtn")
    blocks = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in layers}) if args.blocks else []
    for b in blocks:
        score(f"gptq in block {b} only", lambda n, b=b: "gptq" if f".layers.{b}." in n else "rtn")
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.copy_(originals[n])
    if args.out:
        meta = {"format": args.format, "nsamples": args.nsamples, "seqlen": args.seqlen, "limit": args.limit,
                "iterations": args.iterations, "base_ppl": base_ppl,
                "provenance": provenance(model=loaded.identity(), seed=0, device="cpu")}
        with open(args.out, "w") as fh:
            json.dump({**meta, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
