"""Predicted vs measured layer sensitivity on a real model.

Reads a ``mixq sensitivity`` file with the Hessian and FIT traces (``--sens``), then in this
process, for every quantizable layer alone: the measured KL to the base model on a few
calibration windows (``--kl-windows``, validation split) and the perplexity increase on
``--ppl-windows`` test windows, both with the layer at ``--format`` (RTN). Writes
``OUT.json``, ``OUT.csv`` and ``OUT.md`` (rankings side by side, Spearman correlations of
each predictor with the measured perplexity increase, timings).

    PYTHONPATH=src python3 bench/sensitivity_gpu.py --model M.gguf --data-dir DATA --sens sens.json \\
        --format int3-g128 --out bench/results/sensitivity_h100
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from mixq.data import calibration_windows, load_text, tokenize, windows
from mixq.evaluate import perplexity
from mixq.formats import parse_format
from mixq.models import load_model, quantizable_layers
from mixq.sensitivity import analysis


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--sens", required=True, help="mixq sensitivity output with hessian and/or fit")
    ap.add_argument("--format", default="int3-g128")
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    sens = json.loads(Path(args.sens).read_text())
    loaded = load_model(args.model, dtype=dtype, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    layers = list(quantizable_layers(model))
    test = windows(tokenize(tok, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen, limit=args.ppl_windows)
    val = calibration_windows(tokenize(tok, load_text("wikitext2", "validation", root=args.data_dir)),
                              args.kl_windows, args.seqlen, seed=1)
    t0 = time.perf_counter()
    kl = analysis.measured(model, val, layers, [args.format], batch_size=args.batch_size)
    t_kl = time.perf_counter() - t0
    fmt = parse_format(args.format)
    base = perplexity(model, test, batch_size=args.batch_size, progress=False).ppl
    t0 = time.perf_counter()
    dppl = {}
    with torch.no_grad():
        for n in layers:
            w = model.get_submodule(n).weight
            original = w.data.clone()
            w.data.copy_(fmt.fake_quantize(original))
            dppl[n] = perplexity(model, test, batch_size=args.batch_size, progress=False).ppl - base
            w.data.copy_(original)
    t_ppl = time.perf_counter() - t0

    rows = {}
    for n in layers:
        d = sens["layers"][n]
        row = {"params": d["params"], "measured_kl": kl[n][args.format], "ppl_increase": dppl[n]}
        noise = d["noise"].get(args.format)
        for m in ("hessian", "fit"):
            if m in d:
                row[f"{m}_per_param"] = d[m]["per_param"]
                if noise is not None:  # trace/param x squared quantization error of this layer at the format
                    row[f"{m}_x_noise"] = d[m]["per_param"] * noise
        rows[n] = row
    predictors = [k for k in next(iter(rows.values())) if k not in ("params", "ppl_increase")]
    corr = {k: analysis.spearman([rows[n][k] for n in layers], [rows[n]["ppl_increase"] for n in layers])
            for k in predictors}
    pair = {f"{a}~{b}": analysis.spearman([rows[n][a] for n in layers], [rows[n][b] for n in layers])
            for i, a in enumerate(predictors) for b in predictors[i + 1:]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    record = {"model": args.model, "format": args.format, "device": hw, "date": datetime.date.today().isoformat(),
              "base_ppl": base, "ppl_windows": len(test), "kl_windows": len(val), "seqlen": args.seqlen,
              "seconds": {**sens.get("seconds", {}), "measured_kl": t_kl, "ppl_per_layer": t_ppl},
              "sens_meta": sens.get("meta"), "spearman_vs_ppl_increase": corr, "spearman_between": pair, "layers": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = ["layer," + ",".join(["params", *predictors, "ppl_increase"])]
    lines += [n + "," + ",".join(f"{rows[n][k]:.6g}" for k in ["params", *predictors, "ppl_increase"]) for n in layers]
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n")

    def rank(key: str) -> list[str]:
        return sorted(layers, key=lambda n: -rows[n][key])

    md = [f"# Layer sensitivity, {args.model}, {hw} ({record['date']})", "",
          f"Predictors from `{args.sens}` ({json.dumps(sens.get('meta'))}); measured KL on {len(val)} validation "
          f"windows × {args.seqlen}; perplexity increase on the first {len(test)} WikiText-2 test windows × {args.seqlen} "
          f"(base {base:.3f}: the GGUF's dequantised weights), each layer alone at `{args.format}` (RTN).", "",
          "| timing | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in record["seconds"].items()]
    md += ["", f"Spearman rank correlation with the measured perplexity increase ({len(layers)} layers):", "",
           "| predictor | Spearman |", "|---|---|"]
    md += [f"| {k} | {v:+.3f} |" for k, v in corr.items()]
    md += ["", "Between predictors:", "", "| pair | Spearman |", "|---|---|"]
    md += [f"| {k} | {v:+.3f} |" for k, v in pair.items()]
    keys = [*predictors, "ppl_increase"]
    ranked = {k: rank(k) for k in keys}
    md += ["", "The 15 most sensitive layers by each measure (full table in the CSV):", "",
           "| # | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for i in range(min(15, len(layers))):
        md.append(f"| {i + 1} | " + " | ".join(ranked[k][i].replace("model.layers.", "L") for k in keys) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
