"""Why GPTQ lowers the layer objective yet not the perplexity at 4 bits: in-sample against
held-out reconstruction error.

    python bench/gptq_heldout.py --data-dir DATA --blocks 0,7,15 --out bench/results/gptq_heldout_cpu.json

For the Linear layers of the chosen blocks of the base model, the Gram matrix of each
layer's inputs is taken twice: on calibration windows of the validation split (what the
solvers see) and on windows of the test split (held out).  Each layer is solved from the
calibration Gram with RTN, GPTQ and QuantEase, and every solution is scored on both Grams:
relative error ‖(W − Ŵ)X‖²/‖WX‖², and where the calibration error sits (the share on the
loudest 1% of input features, and on the last 10% of columns, which GPTQ quantizes last).  A solver that fits the calibration Gram's weak
directions shows a small in-sample error and a larger held-out one.  Inputs come from the
full-precision model (not true-sequential), which isolates the solver from error
propagation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mixq.data import calibration_windows, load_text, tokenize, windows
from mixq.formats import parse_format
from mixq.models import load_model, quantizable_layers
from mixq.provenance import provenance
from mixq.solvers import get_solver


def grams(model, layers: dict[str, torch.nn.Module], ids: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Mean XᵀX of each layer's inputs over the tokens of ``ids`` ([n, seqlen])."""
    acc = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    count = {n: 0 for n in layers}

    def hook(name):
        def fn(_m, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            acc[name] += x.T @ x
            count[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            model(ids[i : i + batch])
    for h in handles:
        h.remove()
    return {n: (acc[n] / count[n]).float() for n in layers}


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    d = w - w_hat
    return float(((d @ gram) * d).sum() / ((w @ gram) * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--blocks", default="0,7,15,23")
    ap.add_argument("--formats", default="int4,int4-g128,int3-g128")
    ap.add_argument("--solvers", default="rtn,gptq,quantease")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=32, help="test-split windows for the held-out Gram")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    blocks = [int(b) for b in args.blocks.split(",")]
    layers = {n: m for n, m in quantizable_layers(model).items() if any(f".layers.{b}." in n for b in blocks)}
    val = tokenize(tok, load_text("wikitext2", "validation", root=args.data_dir))
    test = tokenize(tok, load_text("wikitext2", "test", root=args.data_dir))
    t = time.perf_counter()
    calib = grams(model, layers, calibration_windows(val, args.nsamples, args.seqlen, seed=0), args.batch_size)
    held = grams(model, layers, windows(test, args.seqlen, limit=args.heldout), args.batch_size)
    print(f"Grams of {len(layers)} layers in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for spec in args.formats.split(","):
        fmt = parse_format(spec)
        for name, m in layers.items():
            w = m.weight.detach().float()
            for solver_name in args.solvers.split(","):
                solver = get_solver(solver_name)
                r = solver(w, fmt, calib[name], solver.options({}))
                d = w - r.weight
                per_col = ((d @ calib[name]) * d).sum(0)  # each input column's share of the calibration error
                loud = torch.diag(calib[name]).argsort(descending=True)[: max(1, w.shape[1] // 100)]
                rows.append({"format": spec, "layer": name, "solver": solver_name,
                             "calibration": rel_error(w, r.weight, calib[name]),
                             "heldout": rel_error(w, r.weight, held[name]),
                             "weight_change": float((r.weight - w).norm() / w.norm()),
                             "share_loudest_1pct": float(per_col[loud].sum() / per_col.sum()),
                             "share_last_10pct": float(per_col[int(0.9 * w.shape[1]):].sum() / per_col.sum())})
        print(f"{spec}:", flush=True)
        for solver_name in args.solvers.split(","):
            mine = [r for r in rows if r["format"] == spec and r["solver"] == solver_name]
            rtn = {r["layer"]: r for r in rows if r["format"] == spec and r["solver"] == "rtn"}
            cal = statistics.median(r["calibration"] / rtn[r["layer"]]["calibration"] for r in mine)
            hel = statistics.median(r["heldout"] / rtn[r["layer"]]["heldout"] for r in mine)
            chg = statistics.median(r["weight_change"] for r in mine)
            loud = statistics.median(r["share_loudest_1pct"] for r in mine)
            last = statistics.median(r["share_last_10pct"] for r in mine)
            print(f"  {solver_name:>10}: error / RTN's, median over layers: calibration {cal:.3f}, held out {hel:.3f}; "
                  f"‖Ŵ − W‖/‖W‖ {chg:.4f}; share of the error on the loudest 1% of inputs {loud:.2f}, "
                  f"on the last 10% of columns {last:.2f}", flush=True)
    if args.out:
        meta = {"blocks": blocks, "nsamples": args.nsamples, "seqlen": args.seqlen, "heldout": args.heldout,
                "provenance": provenance(model=loaded.identity(), seed=0, device="cpu")}
        with open(args.out, "w") as fh:
            json.dump({**meta, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
