"""``mixq eval``: quantize with each plan and evaluate perplexity, KL to the base and zero-shot accuracy."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mixq.commands.common import (add_calibration_mode, add_shared, calibration, calibration_record, load_for,
                                  parse_plans, provenance_record, say, setup_run, write_report)
from mixq.errors import MixqError

NAME = "eval"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="quantize (optionally) and evaluate perplexity")
    p.add_argument("--plan", action="append", default=None,
                   help="plan file or preset; repeat or comma-separate to compare several (base = unquantized)")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, or a .txt/.jsonl file")
    p.add_argument("--split", default="test")
    p.add_argument("--kl", action="store_true", help="also report KL(base ‖ quantized) on the same windows")
    p.add_argument("--tasks", default=None,
                   help="comma-separated: wikitext2 (perplexity) and zero-shot tasks (arc_easy, piqa, lambada_openai, "
                        "copa, openbook_qa, siqa from the data directory, or any lm-eval task name); --limit caps each")
    add_shared(p)
    add_calibration_mode(p)
    return p


def eval_tasks(tasks: str | None, dataset: str, data_dir: str | None) -> tuple[str | None, list[str]]:
    """(the perplexity dataset or None, zero-shot task names) from ``--tasks`` (default: perplexity
    on ``dataset``); a missing task file is refused before the model loads."""
    from mixq.evaluate.zeroshot import PERPLEXITY_TASKS, resolve_tasks

    if tasks is None:
        return dataset, []
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise MixqError("--tasks is empty")
    if len(set(names)) != len(names):
        raise MixqError(f"--tasks names a task twice: {tasks}")
    zs = [t for t in names if t not in PERPLEXITY_TASKS]
    resolve_tasks(zs, data_dir)
    return ("wikitext2" if len(zs) < len(names) else None), zs


def run(args: argparse.Namespace) -> int:
    from mixq.data import bos_rule, load_text, text_source, tokenize, windows
    from mixq.evaluate import kl_divergence, perplexity
    from mixq.quantize import quantized_copy

    run_ = setup_run(args)
    plans = parse_plans(args.plan, args)
    dataset, zs_tasks = eval_tasks(args.tasks, args.dataset, args.data_dir)
    if args.kl and dataset is None:
        raise MixqError("--kl compares the models on perplexity windows: add wikitext2 to --tasks")
    text = load_text(dataset, args.split, root=args.data_dir) if dataset else None  # a missing file fails before loading
    source = text_source(dataset, args.split, root=args.data_dir) if dataset else None
    loaded = load_for(args, run_)
    for _, plan in plans:
        plan.size_report(loaded.model)  # refuse a bad plan before evaluating anything
    calib = calibration(args, loaded, [p for _, p in plans])
    bos = bos_rule(loaded.model, loaded.tokenizer)
    win = None if text is None else windows(tokenize(loaded.tokenizer, text), args.seqlen, limit=args.limit, bos=bos)
    prov = provenance_record(args, loaded.identity(), run_.device)
    base = loaded.model
    rows = []
    for label, plan in plans:
        with quantized_copy(base, plan, calibration=calib, device=run_.device, batch_size=run_.batch_size,
                            progress=not args.json, log=lambda m: say(args, m),
                            calibration_mode=args.calibration_mode) as (model, q):
            if q is not None:
                write_report(args, label, q)
            report = plan.size_report(base)
            row: dict[str, Any] = {"label": label, "plan": plan.describe()}
            if win is not None:
                ppl = perplexity(model, win, batch_size=run_.batch_size, progress=not args.json)
                row.update({"ppl": ppl.ppl, "dataset": dataset, "split": args.split, "seqlen": args.seqlen,
                            "data_source": source.kind, "dataset_note": source.note, **ppl.to_dict()})
            row.update({"bits_per_weight": report.bits_per_weight, "size_bytes": report.size_bytes,
                        "quantized_layers": report.layers, "quantized_weights": report.quantized_weights,
                        "quantize_seconds": q.seconds if q else 0.0, "size": report.to_dict(),
                        "calibration": calibration_record(args, calib) if q else None})
            if args.kl:
                row["kl"] = 0.0 if model is base else kl_divergence(base, model, win, batch_size=run_.batch_size)
            if args.tasks is not None:
                row["tasks"] = zero_shot(args, model, loaded.tokenizer, zs_tasks, run_.device, bos is not None)
                if win is not None:
                    row["tasks"] = {"wikitext2": {"ppl": row["ppl"], "windows": row["windows"]}, **row["tasks"]}
        row["provenance"] = prov
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            summary = f"ppl {row['ppl']:.4f}, " if "ppl" in row else ""
            say(args, f"{label}: {summary}{report.bits_per_weight:.3f} bits/weight, {report.size_bytes:,} bytes")
    if not args.json:
        table(rows, args, dataset, zs_tasks)
    return 0


def zero_shot(args: argparse.Namespace, model: Any, tokenizer: Any, tasks: list[str], device: str,
              add_bos: bool) -> dict[str, Any]:
    if not tasks:
        return {}
    from mixq.evaluate.zeroshot import evaluate_tasks

    batch = args.batch_size or (64 if device.startswith("cuda") else 8)
    return evaluate_tasks(model, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=batch,
                          device=device, add_bos=add_bos)


def table(rows: list[dict[str, Any]], args: argparse.Namespace, dataset: str | None, tasks: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    w = rows[0]
    excerpt = " (packaged excerpt)" if w.get("data_source") == "excerpt" else ""
    where = f"{dataset}/{args.split}{excerpt} · {w['windows']} × {args.seqlen} tokens" if "ppl" in w else "zero-shot"
    out = Table(title=f"{args.model} · {where}")
    cols = ["plan"] + (["ppl"] if "ppl" in w else []) + ["bits/weight", "size (MB)"] + (["KL"] if args.kl else [])
    for t in tasks:
        cols.append(f"{t} acc" + (" / norm" if "acc_norm" in w["tasks"][t] else ""))
    for col in cols:
        out.add_column(col, justify="left" if col == "plan" else "right")
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
        out.add_row(*cells)
    Console().print(out)
    if tasks:
        n = {t: rows[0]["tasks"][t]["n"] for t in tasks}
        Console().print("zero-shot accuracy in % ± standard error (lm-eval); examples: "
                        + ", ".join(f"{t} {k}" for t, k in n.items()))
