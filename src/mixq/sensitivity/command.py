"""``mixq sensitivity`` and ``mixq allocate``."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from mixq.cli import parse_size, provenance_record, say, setup_run
from mixq.errors import MixqError

def cmd_sensitivity(args: argparse.Namespace) -> int:
    from mixq.data import calibration_windows, load_text, tokenize
    from mixq.formats import parse_format
    from mixq.models import load_model, matrix_by_name, quantizable_matrices
    from mixq.plan import Plan
    from mixq.sensitivity import analysis

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in analysis.METHODS]
    if unknown or not methods:
        raise MixqError(f"unknown sensitivity method {', '.join(unknown) or '(none)'} (one of {', '.join(analysis.METHODS)})")
    formats = [parse_format(f).name for f in args.formats.split(",") if f.strip()]
    device, dtype, batch = setup_run(args)
    if "hessian" in methods and dtype == "float16":
        dtype = "float32"  # second derivatives in fp16 overflow; the trace is taken in fp32
    if device.startswith("cuda") and dtype == "float32":
        import torch

        # TF32 matrix products (10-bit mantissa) for the gradients: far below the estimators' sampling error.
        torch.backends.cuda.matmul.allow_tf32 = True
    attention = "eager" if "hessian" in methods else None  # SDPA has no double backward; it is faster otherwise
    say(args, f"loading {args.model} ({dtype}, {device}, {attention or 'default'} attention)")
    loaded = load_model(args.model, dtype=dtype, device=device, attn_implementation=attention)
    model = loaded.model
    layers = list(quantizable_matrices(model))
    if not layers:
        raise MixqError("the model has no quantizable layer")
    ids = tokenize(loaded.tokenizer, load_text(args.calib_dataset, args.calib_split, root=args.data_dir))
    win = calibration_windows(ids, args.nsamples, args.seqlen, seed=args.seed)
    out = Path(args.out)
    meta = {"model": args.model, "sha256": loaded.identity()["sha256"], "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed, "formats": formats}
    sens: dict[str, Any] = {}
    if out.is_file():  # resume: keep what a previous run with the same settings finished
        old = json.loads(out.read_text())
        if old.get("meta") == meta:
            sens = old
            say(args, f"resuming {out}: {', '.join(old.get('methods_done', []))} already done")
    if not sens:
        rep = Plan().size_report(model)
        sens = {"meta": meta, "methods_done": [], "layers": analysis.geometry(model, layers, formats),
                "other_bits": rep.other_bits - sum(matrix_by_name(model, n).numel * 16 for n in layers),
                "provenance": provenance_record(args, loaded.identity(), device)}
    timings = sens.setdefault("seconds", {})
    for m in methods:
        if m in sens["methods_done"]:
            continue
        start = time.perf_counter()
        if m == "hessian":
            t0 = time.perf_counter()

            def tick(it: int) -> None:
                say(args, f"hessian: probe {it + 1}/{args.max_iter}, {time.perf_counter() - t0:.1f} s")

            res = analysis.hessian(model, win, layers, max_iter=args.max_iter, tol=args.tol, per_layer=args.per_layer,
                                   batch_size=batch, seed=args.seed, progress=tick,
                                   max_seconds=args.max_time, probe_windows=args.probe_windows)
        elif m == "fit":
            res = analysis.fisher(model, win, layers)
            for n, d in res.items():
                d["score"] = {f: d["per_param"] * sens["layers"][n]["noise"][f] for f in formats}
        else:
            res = analysis.measured(model, win, layers, formats, batch_size=batch)
        timings[m] = time.perf_counter() - start
        for n, d in res.items():
            sens["layers"][n][m] = d
        sens["methods_done"].append(m)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(sens, indent=2))  # partial results survive a later failure
        say(args, f"{m}: {timings[m]:.1f} s")
    _sensitivity_outputs(args, sens, out, formats)
    return 0


def _primary(d: dict[str, Any], m: str, f: str) -> float:
    return d[m]["per_param"] if m in ("hessian", "fit") else d[m][f]


def _sensitivity_outputs(args: argparse.Namespace, sens: dict[str, Any], out: Path, formats: list[str]) -> None:
    from mixq.sensitivity.analysis import spearman

    methods, layers = sens["methods_done"], sens["layers"]
    f0 = formats[0]
    lines = ["layer,params," + ",".join(f"{m}" if m != "measured" else f"measured_kl_{f}" for m in methods for f in ([f0] if m != "measured" else formats))]
    for n, d in layers.items():
        cells = [n, str(d["params"])]
        for m in methods:
            cells += [f"{_primary(d, m, f):.6g}" for f in ([f0] if m != "measured" else formats)]
        lines.append(",".join(cells))
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    names = list(layers)
    corr = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            corr[f"{a}~{b}"] = spearman([_primary(layers[n], a, f0) for n in names], [_primary(layers[n], b, f0) for n in names])
    sens["spearman"] = corr
    out.write_text(json.dumps(sens, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m = methods[0]
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.05), 3))
        ax.bar(range(len(names)), [_primary(layers[n], m, f0) for n in names],
               color=[f"C{kinds.index(n.rsplit('.', 1)[-1]) % 10}" for n in names])
        ax.set_yscale("log")
        ax.set_xlabel("layer (model order; colour = module type: " + ", ".join(kinds) + ")", fontsize=7)
        ax.set_ylabel(m)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        plt.close(fig)
    except ImportError:
        pass
    if args.json:
        print(json.dumps({"out": str(out), "methods": methods, "spearman": corr, "seconds": sens.get("seconds")}))
    else:
        print(f"wrote {out}, {out.with_suffix('.csv')}; methods {', '.join(methods)}")
        for k, v in corr.items():
            print(f"  Spearman {k}: {v:+.3f}")


def cmd_allocate(args: argparse.Namespace) -> int:
    from mixq.sensitivity.allocate import JITTER, allocate, plan_of

    path = Path(args.sens)
    if not path.is_file():
        raise MixqError(f"sensitivity file not found: {path}")
    sens = json.loads(path.read_text())
    max_size = None if args.max_size is None else parse_size(args.max_size)
    out = Path(args.out)
    for k in range(max(args.starts, 1)):
        choice = allocate(sens, max_bits=args.max_bits, max_size=max_size, jitter=0.0 if k == 0 else JITTER,
                          seed=args.seed + k)
        target = out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        plan_of(choice).save(target)
        params = sum(d["params"] for d in sens["layers"].values())
        bits = sum(sens["layers"][n]["bits"][f] for n, f in choice.items())
        print(f"{target}: {bits / params:.4f} bits/weight, {math.ceil((bits + sens['other_bits']) / 8):,} bytes")
    return 0
