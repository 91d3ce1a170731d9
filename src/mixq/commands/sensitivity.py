"""``mixq sensitivity``: per-layer Hessian trace (Hutchinson), Fisher trace (FIT) and measured KL."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mixq.commands.common import (Run, add_cluster_options, add_shared, cluster_of, provenance_record, say, setup_run,
                                  solver_options)
from mixq.errors import MixqError

NAME = "sensitivity"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    sn = subparsers.add_parser("sensitivity", help="per-layer Hessian trace, Fisher trace (FIT) and measured KL")
    sn.add_argument("--method", default="fit", help="comma-separated: hessian, fit, measured")
    sn.add_argument("--formats", default="int4-g128,int3-g128",
                    help="formats (or search-space choices such as int3-g64:quantease) for FIT scores and measured KL; "
                         "--solver and its options serve those that name no solver")
    sn.add_argument("--db", default=None, metavar="DIR",
                    help="layer database the quantized weights come from (needed by choices whose solver needs "
                         "calibration); it keeps its own calibration set (built where it lacks entries), while "
                         "--nsamples and --seqlen choose the windows the scores are measured on")
    sn.add_argument("--out", required=True, help="sens.json (a .csv and a .png are written beside it)")
    sn.add_argument("--max-iter", type=int, default=100, help="Hutchinson probes at most")
    sn.add_argument("--tol", type=float, default=1e-2, help="stop once every stderr < tol x |trace|")
    sn.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                    help="Hutchinson: stop after this long (at least two probes; the standard errors say how far it got)")
    sn.add_argument("--per-layer", action="store_true", help="Hutchinson one layer at a time (less memory)")
    sn.add_argument("--probe-windows", type=int, default=None, metavar="N",
                    help="Hutchinson: each probe uses the next N calibration windows, cycling (default: all); "
                         "many cheap probes beat a few exact ones")
    add_cluster_options(sn)  # hessian (one layer per call, as --per-layer) and measured split by layer; fit does not
    add_shared(sn)
    return sn


def run(args: argparse.Namespace) -> int:
    from mixq.data import model_windows, tensor_sha256
    from mixq.models import load_model, matrix_by_name, quantizable_matrices
    from mixq.search.space import choice_name, parse_choice
    from mixq.plan import Plan
    from mixq.sensitivity import analysis

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in analysis.METHODS]
    if unknown or not methods:
        raise MixqError(f"unknown sensitivity method {', '.join(unknown) or '(none)'} (one of {', '.join(analysis.METHODS)})")
    opts = solver_options(args)
    formats = [choice_name(f.strip(), args.solver or "rtn", opts) for f in _split_choices(args.formats)]
    specs = {f: parse_choice(f, args.solver or "rtn", opts) for f in formats}
    run_ = setup_run(args)
    device, dtype, batch = run_.device, run_.dtype, run_.batch_size
    cluster = cluster_of(args, device)
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
    win = model_windows(model, loaded.tokenizer, args.calib_dataset, args.calib_split, args.seqlen, root=args.data_dir,
                        nsamples=args.nsamples, seed=args.seed)
    weights, key = _choice_weights(args, loaded, layers, specs, dtype, run_)
    if cluster is not None and weights is not None and "measured" in methods:
        raise MixqError("--workers measures KL of plain formats (RTN); choices with a solver or --db run in one process")
    out = Path(args.out)
    # the resume key: every input of the scores, the calibration windows by their hash
    meta = {"model": args.model, "sha256": loaded.identity()["sha256"], "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed, "formats": formats, "calibration": {"dataset": args.calib_dataset, "split": args.calib_split,
                                                                  "windows_sha256": tensor_sha256(win)},
            "dtype": dtype, "hessian": {"max_iter": args.max_iter, "tol": args.tol, "per_layer": args.per_layer or bool(cluster),
                                        "probe_windows": args.probe_windows, "max_time": args.max_time,
                                        **({"seeds": "seed + layer index"} if cluster else {})},
            "choices": {f: spec.to_dict() for f, spec in specs.items()},
            "database": None if key is None else key.to_dict()}
    sens: dict[str, Any] = {}
    if out.is_file():  # resume: keep what a previous run with the same settings finished
        old = json.loads(out.read_text())
        if old.get("meta") == meta:
            sens = old
            say(args, f"resuming {out}: {', '.join(old.get('methods_done', []))} already done")
    if not sens:
        rep = Plan().size_report(model)
        sens = {"meta": meta, "methods_done": [], "choices": meta["choices"],
                "layers": analysis.geometry(model, layers, formats, specs=specs, weights=weights),
                "other_bits": rep.other_bits - sum(matrix_by_name(model, n).numel * 16 for n in layers),
                "provenance": provenance_record(args, loaded.identity(), device)}
    timings = sens.setdefault("seconds", {})
    for m in methods:
        if m in sens["methods_done"]:
            continue
        start = time.perf_counter()
        if cluster is not None and m in ("hessian", "measured"):
            res = _distributed(args, m, cluster, dtype, attention, win, layers, formats, batch)
        elif m == "hessian":
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
            res = analysis.measured(model, win, layers, formats, batch_size=batch, weights=weights)
        timings[m] = time.perf_counter() - start
        for n, d in res.items():
            sens["layers"][n][m] = d
        sens["methods_done"].append(m)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(sens, indent=2))  # partial results survive a later failure
        say(args, f"{m}: {timings[m]:.1f} s")
    _sensitivity_outputs(args, sens, out, formats)
    return 0


def _distributed(args: argparse.Namespace, method: str, cluster: Any, dtype: str, attention: str | None, win: Any,
                 layers: list[str], formats: list[str], batch: int) -> dict[str, dict[str, Any]]:
    """``method`` split by layer over the Ray workers; --max-time stays the wall-clock budget."""
    from mixq.cluster import ModelSpec
    from mixq.sensitivity import distributed

    spec = ModelSpec(args.model, dtype, cluster.device, attention)

    def tick(done: int, total: int) -> None:
        say(args, f"{method}: {done}/{total} done on {cluster.workers} workers")

    if method == "measured":
        return distributed.measured(spec, win, layers, formats, batch_size=batch, cluster=cluster, progress=tick)
    per_layer = None if args.max_time is None else args.max_time * cluster.workers / len(layers)
    return distributed.hessian(spec, win, layers, max_iter=args.max_iter, tol=args.tol, batch_size=batch, seed=args.seed,
                               cluster=cluster, max_seconds=per_layer, probe_windows=args.probe_windows, progress=tick)


def _split_choices(text: str) -> list[str]:
    """Comma-separated choices; a choice's own options (``int3:quantease:outliers=0.01,structured=true``) stay with it."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part  # another option of the choice before
        elif part:
            out.append(part)
    return out


def _choice_weights(args: argparse.Namespace, loaded: Any, layers: list[str], specs: dict[str, Any], dtype: str,
                    run: Any) -> tuple[Any, Any]:
    """(the quantized weight of each (layer, choice), the layer database's key): RTN of the format
    (None, None) for plain formats without --db, else a weight cache over the database."""
    from mixq.commands.database import ensure_entries, open_recorded
    from mixq.plan import LayerSpec
    from mixq.search.cache import WeightCache
    from mixq.solvers import get_solver

    if args.db is None:
        if all(spec == LayerSpec.of(f) for f, spec in specs.items()):
            return None, None
        calibrated = [f for f, spec in specs.items() if get_solver(spec.solver).needs_calibration]
        if calibrated:
            raise MixqError(f"choice {calibrated[0]!r} is solved with calibration data: give --db DIR (a layer "
                            "database, mixq database build)")
        return WeightCache(loaded.model, layers, list(specs), lambda _n, c: specs[c]).weight, None
    db, windows = open_recorded(args.db, loaded, dtype, args.data_dir)
    from mixq.models import transformer_blocks

    prefix = transformer_blocks(loaded.model)[0] + "."
    pairs = [(n, spec) for n in layers if n.startswith(prefix) for spec in specs.values()]
    batch = Run(run.device, run.dtype, db.key.calibration.batch_size, run.seed)  # the database's summation order
    ensure_entries(args, loaded.model, db, pairs, windows, batch)
    return WeightCache(loaded.model, layers, list(specs), lambda _n, c: specs[c], database=db).weight, db.key


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


