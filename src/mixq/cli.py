"""Command line: ``mixq formats|quantize|eval|search|report|sensitivity|allocate|embed-eval`` (parsers and the
shared helpers here; the search and sensitivity commands live beside their packages)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from mixq.errors import MixqError
from mixq.models import DEFAULT_MODEL

def _shared(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and evaluation")
    g.add_argument("--model", default=DEFAULT_MODEL, help="named model (smollm2-135m, gemma3-270m), a .gguf file or a Hugging Face folder")
    g.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows (calibrated solvers)")
    g.add_argument("--data-dir", default=None, help="data directory (default: $MIXQ_DATA_DIR)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on cuda, float32 on cpu)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default 8 on cuda, 2 on cpu)")
    g.add_argument("--json", action="store_true", help="print one JSON object per result on stdout")
    c = p.add_argument_group("solvers and calibration")
    c.add_argument("--solver", default=None, help="rtn, gptq, quantease, gptq+quantease (default: the plan's, else rtn)")
    c.add_argument("--outliers", type=float, default=None, help="fraction of weights kept in 16 bits (e.g. 0.01): rtn and gptq keep the most salient, quantease moves them (Algorithm 3)")
    c.add_argument("--structured", action="store_true", help="with --outliers: whole columns")
    c.add_argument("--keep-columns", type=float, default=None, help="GPTQ: fraction of input columns (largest activations) kept in 16 bits")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="solver option for every layer (e.g. act_order=true)")
    c.add_argument("--calib-dataset", default="wikitext2", help="calibration text (default wikitext2)")
    c.add_argument("--calib-split", default="validation")
    c.add_argument("--report", default=None, metavar="PATH", help="write the per-layer reconstruction report (JSON) and print it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Mixed-precision weight quantization of transformer LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("formats", help="list the number formats with their bits per weight")
    f.add_argument("--cols", type=int, default=4096, help="row width used for per-channel overheads (default 4096)")
    f.add_argument("--json", action="store_true")

    q = sub.add_parser("quantize", help="quantize a model with a plan and save it")
    q.add_argument("--plan", required=True, help="plan file (.yaml/.json) or preset (e.g. int4-g128)")
    q.add_argument("--out", required=True, help="output folder")
    _shared(q)

    e = sub.add_parser("eval", help="quantize (optionally) and evaluate perplexity")
    e.add_argument("--plan", action="append", default=None,
                   help="plan file or preset; repeat or comma-separate to compare several (base = unquantized)")
    e.add_argument("--dataset", default="wikitext2", help="wikitext2, or a .txt/.jsonl file")
    e.add_argument("--split", default="test")
    e.add_argument("--kl", action="store_true", help="also report KL(base ‖ quantized) on the same windows")
    e.add_argument("--tasks", default=None,
                   help="comma-separated: wikitext2 (perplexity) and zero-shot tasks (arc_easy, piqa, lambada_openai, "
                        "copa, openbook_qa, siqa from the data directory, or any lm-eval task name); --limit caps each")
    _shared(e)
    se = sub.add_parser("search", help="search per-layer formats under a size budget")
    se.add_argument("--space", default=None, help="search space file (YAML/JSON); default: block granularity, int2..int8")
    se.add_argument("--objective", default="ppl", choices=["ppl", "pareto", "acc"],
                    help="ppl: lowest perplexity on validation windows within the budget (with --min-acc: among plans "
                         "accurate enough); pareto: the perplexity/size front; acc: highest mean zero-shot accuracy over "
                         "--tasks within the budget")
    se.add_argument("--tasks", default=None,
                    help="comma-separated zero-shot tasks (arc_easy, piqa, lambada_openai, copa, openbook_qa, siqa from "
                         "the data directory, or lm-eval task names), scored in every trial on the first --task-limit "
                         "examples of each and in the final table; needed by --objective acc and --min-acc")
    se.add_argument("--task-limit", type=int, default=200, metavar="N",
                    help="examples of each task per trial: the first N, the same in every trial (default 200)")
    se.add_argument("--task-metric", default="acc", choices=["acc", "acc_norm"],
                    help="the per-task accuracy averaged over --tasks into a trial's acc: acc (the choice of highest "
                         "log-likelihood) or acc_norm (lm-eval's, log-likelihood per character); default acc")
    se.add_argument("--min-acc", type=float, default=None, metavar="X",
                    help="with --objective ppl: a plan whose mean accuracy over --tasks (on the trial subset) is below X "
                         "(0..1) is infeasible: recorded, never the best")
    se.add_argument("--final-task-limit", type=int, default=None, metavar="N",
                    help="examples of each task in the final table (default: all)")
    se.add_argument("--max-size", default=None, help="model size budget, e.g. 100MB, 95MiB, 1.5GB or bytes")
    se.add_argument("--max-bits", type=float, default=None, help="average bits per quantized weight budget")
    se.add_argument("--backend", default="tpe", help="tpe, nsga2, nsga3, qmc, random, gp (Optuna), ax (Bayesian optimisation), evo (local search)")
    se.add_argument("--trials", type=int, default=100)
    se.add_argument("--run-dir", required=True, help="where the study, trials and report are kept")
    se.add_argument("--resume", action="store_true", help="continue the study in --run-dir")
    se.add_argument("--final-limit", type=int, default=None, help="test windows for the final table (default: all)")
    se.add_argument("--initial", action="append", default=[], metavar="PLAN", help="a plan to evaluate first (repeatable)")
    se.add_argument("--sens", default=None, help="sensitivity file (mixq sensitivity): guided starts from it")
    se.add_argument("--starts", type=int, default=4, help="with --sens: how many guided starts (default 4)")
    _shared(se)

    sn = sub.add_parser("sensitivity", help="per-layer Hessian trace, Fisher trace (FIT) and measured KL")
    sn.add_argument("--method", default="fit", help="comma-separated: hessian, fit, measured")
    sn.add_argument("--formats", default="int4-g128,int3-g128", help="formats for FIT scores and measured KL")
    sn.add_argument("--out", required=True, help="sens.json (a .csv and a .png are written beside it)")
    sn.add_argument("--max-iter", type=int, default=100, help="Hutchinson probes at most")
    sn.add_argument("--tol", type=float, default=1e-2, help="stop once every stderr < tol x |trace|")
    sn.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                    help="Hutchinson: stop after this long (at least two probes; the standard errors say how far it got)")
    sn.add_argument("--per-layer", action="store_true", help="Hutchinson one layer at a time (less memory)")
    sn.add_argument("--probe-windows", type=int, default=None, metavar="N",
                    help="Hutchinson: each probe uses the next N calibration windows, cycling (default: all); "
                         "many cheap probes beat a few exact ones")
    _shared(sn)

    al = sub.add_parser("allocate", help="a plan from sensitivity scores and a budget")
    al.add_argument("--sens", required=True)
    al.add_argument("--max-bits", type=float, default=None)
    al.add_argument("--max-size", default=None)
    al.add_argument("--out", required=True, help="plan file (.yaml or .json)")
    al.add_argument("--starts", type=int, default=1, help="also write N-1 randomised variants (OUT-1.yaml, ...)")
    al.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="re-render the report of a search run directory")
    r.add_argument("run_dir")

    from mixq.evaluate import embed_command

    embed_command.add_parser(sub)
    return parser


def parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not m:
        raise MixqError(f"--max-size {text!r}: expected a size such as 100MB, 95MiB or 123456789")
    unit = m.group(2) or "b"
    scale = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    return int(float(m.group(1)) * scale)


# -- helpers -----------------------------------------------------------------------------
def setup_run(args: argparse.Namespace) -> tuple[str, str, int]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MixqError("--device cuda: no CUDA device is available")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    batch = args.batch_size or (8 if device.startswith("cuda") else 2)
    if args.seqlen < 2:
        raise MixqError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.limit is not None and args.limit < 1:
        raise MixqError(f"--limit must be positive, got {args.limit}")
    torch.manual_seed(args.seed)
    return device, dtype, batch


def _option_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _solver_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in args.option:
        if "=" not in item:
            raise MixqError(f"--option {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        opts[k.strip()] = _option_value(v)
    if args.outliers is not None:
        opts["outliers"] = args.outliers
        if args.structured:
            opts["structured"] = True
    elif args.structured:
        raise MixqError("--structured needs --outliers")
    if args.keep_columns is not None:
        opts["keep_columns"] = args.keep_columns
    return opts


def _plans(values: list[str] | None, args: argparse.Namespace) -> list[tuple[str, Any]]:
    from mixq.plan import Plan

    names = [v.strip() for value in (values or ["base"]) for v in value.split(",") if v.strip()]
    opts = _solver_options(args)
    return [(n if not Path(n).suffix else Path(n).stem, Plan.parse(n).with_solver(args.solver, opts)) for n in names]


def _calibration(args: argparse.Namespace, tokenizer: Any, plans: list[Any]):  # type: ignore[no-untyped-def]
    """Calibration windows when a plan's solver needs them (or a report is asked for)."""
    if not (args.report or any(p.needs_calibration() for p in plans)):
        return None
    from mixq.data import calibration_windows, load_text, tokenize

    if args.nsamples < 1:
        raise MixqError(f"--nsamples must be positive, got {args.nsamples}")
    ids = tokenize(tokenizer, load_text(args.calib_dataset, args.calib_split, root=args.data_dir))
    say(args, f"calibration: {args.nsamples} windows x {args.seqlen} tokens from {args.calib_dataset}/{args.calib_split} (seed {args.seed})")
    return calibration_windows(ids, args.nsamples, args.seqlen, seed=args.seed)


def _calibration_record(args: argparse.Namespace, calib: Any) -> dict[str, Any] | None:
    if calib is None:
        return None
    return {"dataset": args.calib_dataset, "split": args.calib_split, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed, "mode": "sequential: each block sees the outputs of the quantized blocks before it"}


def _write_report(args: argparse.Namespace, label: str, result: Any) -> None:
    if not args.report:
        return
    rows = result.report()
    path = Path(args.report)
    if path.suffix != ".json":
        path = path / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"plan": label, "layers": rows}, indent=2))
    if args.json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reconstruction error ‖WX−ŴX‖²/‖WX‖² · {label} -> {path}")
    for col in ("layer", "format", "solver", "rtn", "solver error", "ratio"):
        table.add_column(col, justify="left" if col in ("layer", "format", "solver") else "right")
    for r in rows:
        if r["rel_error"] is None:
            continue
        ratio = r["rel_error"] / r["rtn_rel_error"] if r["rtn_rel_error"] else float("nan")
        table.add_row(r["layer"], r["format"], r["solver"], f"{r['rtn_rel_error']:.3e}", f"{r['rel_error']:.3e}", f"{ratio:.3f}")
    Console().print(table)


def provenance_record(args: argparse.Namespace, identity: dict[str, str], device: str) -> dict[str, Any]:
    from mixq.provenance import provenance

    return provenance(model=identity, seed=args.seed, device=device, command=args.command_line)


def say(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


# -- commands ----------------------------------------------------------------------------
def cmd_formats(args: argparse.Namespace) -> int:
    from mixq.formats import families, parse_format

    examples = ["int8", "int8-sym", "int4-g128", "int4-g32", "int4-fmin-g32", "int3-g128", "int2-g64",
                "fp8-e4m3", "fp8-e5m2", "fp6-e3m2", "fp6-e2m3", "fp4-e2m1", "fp8-e4m3-dn", "log4", "nf4-g64",
                "nf3-g64", "mxfp4", "mxfp6-e3m2", "mxfp8-e4m3", "mxint8", "bfp4-g16", "bmf6-e3m2-g16", "blog4-g16"]
    rows = [(n, parse_format(n).bits_per_weight((1, args.cols))) for n in examples]
    if args.json:
        print(json.dumps({"families": families(), "formats": {n: b for n, b in rows}, "cols": args.cols}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"formats (bits per weight for rows of {args.cols})")
    table.add_column("format")
    table.add_column("bits/weight", justify="right")
    for n, b in rows:
        table.add_row(n, f"{b:.4f}")
    console = Console()
    console.print(table)
    for prefix, text in families().items():
        console.print(f"[bold]{prefix}[/bold]  {text}")
    return 0


def load_for(args: argparse.Namespace, device: str, dtype: str):  # type: ignore[no-untyped-def]
    from mixq.models import load_model

    say(args, f"loading {args.model} ({dtype}, {device})")
    return load_model(args.model, dtype=dtype, device=device)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from mixq.plan import Plan
    from mixq.provenance import provenance
    from mixq.quantize import quantize_

    device, dtype, batch = setup_run(args)
    plan = Plan.parse(args.plan).with_solver(args.solver, _solver_options(args))
    out = Path(args.out)
    loaded = load_for(args, device, dtype)
    report = plan.size_report(loaded.model)  # validates the plan before any work
    calib = _calibration(args, loaded.tokenizer, [plan])
    result = quantize_(loaded.model, plan, calibration=calib, device=device, batch_size=batch,
                       progress=not args.json, log=lambda m: say(args, m))
    _write_report(args, Path(args.plan).stem if Path(args.plan).suffix else args.plan, result)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.yaml")
    tensors = {}
    for name, layer in result.layers.items():
        tensors[f"{name}.codes"] = layer.qtensor.codes.contiguous().cpu()
        for k, v in layer.qtensor.params.items():
            tensors[f"{name}.{k}"] = v.to(torch.float32).contiguous().cpu()
        if layer.outliers is not None:
            sparse = layer.outliers.to_sparse_csr()
            tensors[f"{name}.outliers.crow"] = sparse.crow_indices().to(torch.int32).cpu()
            tensors[f"{name}.outliers.col"] = sparse.col_indices().to(torch.int32).cpu()
            tensors[f"{name}.outliers.values"] = sparse.values().to(torch.float16).cpu()
    save_file(tensors, str(out / "codes.safetensors"),
              metadata={n: json.dumps({"format": l.qtensor.fmt, "group_size": l.qtensor.group_size}) for n, l in result.layers.items()})
    loaded.model.save_pretrained(out / "model")
    loaded.tokenizer.save_pretrained(out / "model")
    record = {"plan": plan.describe(), **report.to_dict(), "quantize_seconds": result.seconds, "out": str(out),
              "calibration": _calibration_record(args, calib),
              "provenance": provenance(model=loaded.identity(), seed=args.seed, device=device, command=args.command_line)}
    (out / "result.json").write_text(json.dumps(record, indent=2))
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{plan.describe()}: {report.bits_per_weight:.4f} bits/weight, {report.size_bytes:,} bytes -> {out}")
        print(f"  {out / 'model'}: fake-quantized Hugging Face model (mixq eval --model {out / 'model'})")
        print(f"  {out / 'codes.safetensors'}: integer codes and group parameters per layer")
    return 0


def _eval_tasks(args: argparse.Namespace) -> tuple[bool, list[str]]:
    """(perplexity wanted, zero-shot task names) from ``--tasks`` (default: perplexity on --dataset)."""
    from mixq.evaluate.zeroshot import PERPLEXITY_TASKS, resolve_tasks

    if args.tasks is None:
        return True, []
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise MixqError("--tasks is empty")
    if len(set(names)) != len(names):
        raise MixqError(f"--tasks names a task twice: {args.tasks}")
    zs = [t for t in names if t not in PERPLEXITY_TASKS]
    resolve_tasks(zs, args.data_dir)  # a missing task file is refused before the model loads
    if len(zs) < len(names):
        args.dataset = "wikitext2"
    return len(zs) < len(names), zs


def cmd_eval(args: argparse.Namespace) -> int:
    from mixq.data import load_text, tokenize, windows
    from mixq.evaluate import kl_divergence, perplexity
    from mixq.provenance import provenance
    from mixq.quantize import quantize_

    device, dtype, batch = setup_run(args)
    plans = _plans(args.plan, args)
    want_ppl, zs_tasks = _eval_tasks(args)
    if args.kl and not want_ppl:
        raise MixqError("--kl compares the models on perplexity windows: add wikitext2 to --tasks")
    text = load_text(args.dataset, args.split, root=args.data_dir) if want_ppl else None
    loaded = load_for(args, device, dtype)
    for _, plan in plans:
        plan.size_report(loaded.model)  # refuse a bad plan before evaluating anything
    calib = _calibration(args, loaded.tokenizer, [p for _, p in plans])
    gemma = getattr(loaded.model.config, "model_type", "").startswith("gemma")
    win = None
    if want_ppl:
        ids = tokenize(loaded.tokenizer, text)
        win = windows(ids, args.seqlen, limit=args.limit, bos=loaded.tokenizer.bos_token_id if gemma else None)
    prov = provenance(model=loaded.identity(), seed=args.seed, device=device, command=args.command_line)
    base = loaded.model
    rows = []
    for label, plan in plans:
        model = base if not plan.resolve(base) else copy.deepcopy(base)
        q = None
        if model is not base:
            q = quantize_(model, plan, calibration=calib, device=device, batch_size=batch, progress=not args.json,
                          log=lambda m: say(args, m))
            _write_report(args, label, q)
        report = plan.size_report(base)
        row: dict[str, Any] = {"label": label, "plan": plan.describe()}
        if win is not None:
            ppl = perplexity(model, win, batch_size=batch, progress=not args.json)
            row.update({"ppl": ppl.ppl, "dataset": args.dataset, "split": args.split, "seqlen": args.seqlen,
                        **ppl.to_dict()})
        row.update({"bits_per_weight": report.bits_per_weight, "size_bytes": report.size_bytes,
                    "quantize_seconds": q.seconds if q else 0.0, "size": report.to_dict(),
                    "calibration": _calibration_record(args, calib) if q else None})
        if args.kl:
            row["kl"] = 0.0 if model is base else kl_divergence(base, model, win, batch_size=batch)
        if args.tasks is not None:
            row["tasks"] = _zero_shot(args, model, loaded.tokenizer, zs_tasks, device, gemma)
            if win is not None:
                row["tasks"] = {"wikitext2": {"ppl": row["ppl"], "windows": row["windows"]}, **row["tasks"]}
        row["provenance"] = prov
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            summary = f"ppl {row['ppl']:.4f}, " if "ppl" in row else ""
            say(args, f"{label}: {summary}{report.bits_per_weight:.3f} bits/weight, {report.size_bytes:,} bytes")
        if model is not base:
            del model
    if not args.json:
        _table(rows, args, zs_tasks)
    return 0


def _zero_shot(args: argparse.Namespace, model: Any, tokenizer: Any, tasks: list[str], device: str,
               gemma: bool) -> dict[str, Any]:
    if not tasks:
        return {}
    from mixq.evaluate.zeroshot import evaluate_tasks

    batch = args.batch_size or (64 if device.startswith("cuda") else 8)
    return evaluate_tasks(model, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=batch,
                          device=device, add_bos=gemma)


def _table(rows: list[dict[str, Any]], args: argparse.Namespace, tasks: list[str] = ()) -> None:  # type: ignore[assignment]
    from rich.console import Console
    from rich.table import Table

    w = rows[0]
    where = f"{args.dataset}/{args.split} · {w['windows']} × {args.seqlen} tokens" if "ppl" in w else "zero-shot"
    table = Table(title=f"{args.model} · {where}")
    cols = ["plan"] + (["ppl"] if "ppl" in w else []) + ["bits/weight", "size (MB)"] + (["KL"] if args.kl else [])
    for t in tasks:
        cols.append(f"{t} acc" + (" / norm" if "acc_norm" in w["tasks"][t] else ""))
    for col in cols:
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in rows:
        cells = [r["label"]] + ([f"{r['ppl']:.3f}"] if "ppl" in r else [])
        cells += [f"{r['bits_per_weight']:.3f}", f"{r['size_bytes'] / 1e6:.2f}"]
        if args.kl:
            cells.append(f"{r['kl']:.4f}")
        for t in tasks:
            m = r["tasks"][t]
            cell = f"{100 * m['acc']:.1f}±{100 * m.get('acc_stderr', float('nan')):.1f}"
            if "acc_norm" in m:
                cell += f" / {100 * m['acc_norm']:.1f}"
            cells.append(cell)
        table.add_row(*cells)
    Console().print(table)
    if tasks:
        n = {t: rows[0]["tasks"][t]["n"] for t in tasks}
        Console().print("zero-shot accuracy in % ± standard error (lm-eval); examples: "
                        + ", ".join(f"{t} {k}" for t, k in n.items()))


def _command(name: str):  # type: ignore[no-untyped-def]
    """The function of a subcommand; search and sensitivity live beside their packages."""
    local = {"formats": cmd_formats, "quantize": cmd_quantize, "eval": cmd_eval}
    if name in local:
        return local[name]
    if name == "embed-eval":
        from mixq.evaluate.embed_command import cmd_embed_eval

        return cmd_embed_eval
    from mixq.search import command as search_cmd
    from mixq.sensitivity import command as sens_cmd

    return {"search": search_cmd.cmd_search, "report": search_cmd.cmd_report,
            "sensitivity": sens_cmd.cmd_sensitivity, "allocate": sens_cmd.cmd_allocate}[name]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mixq never downloads; models come from disk
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["mixq", *argv])
    try:
        return _command(args.command)(args)
    except MixqError as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
