"""What every command shares: option definitions, the run settings read from them, plan and
calibration parsing, messages.  Commands import this module; nothing here imports a command."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq.errors import MixqError
from mixq.models import DEFAULT_MODEL

CPU_BATCH, CUDA_BATCH = 2, 8  # windows per forward pass by default


# -- option definitions ----------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, *, model_default: str = DEFAULT_MODEL,
                      model_help: str = "named model (smollm2-135m, gemma3-270m), a .gguf file or a Hugging Face folder",
                      eval_options: bool = True) -> None:
    """--model, --seqlen, --limit, --nsamples, --data-dir, --device, --dtype, --seed, --batch-size, --json."""
    g = p.add_argument_group("model and evaluation")
    g.add_argument("--model", default=model_default, help=model_help)
    if eval_options:
        g.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
        g.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
        g.add_argument("--nsamples", type=int, default=128, help="calibration windows (calibrated solvers)")
    g.add_argument("--data-dir", default=None, help="data directory (default: $MIXQ_DATA_DIR)")
    add_device_options(g)
    g.add_argument("--json", action="store_true", help="print one JSON object per result on stdout")


def add_device_options(g: Any, *, batch_default: int | None = None,
                       batch_help: str = "windows per forward pass (default 8 on cuda, 2 on cpu)") -> None:
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float16 on cuda, float32 on cpu)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)


def add_solver_options(p: argparse.ArgumentParser, *, calibration: bool = True) -> None:
    """--solver, --outliers, --structured, --keep-columns, --option; with ``calibration`` the
    calibration text and the per-layer report too."""
    c = p.add_argument_group("solvers and calibration")
    c.add_argument("--solver", default=None, help="rtn, gptq, quantease, gptq+quantease (default: the plan's, else rtn)")
    c.add_argument("--outliers", type=float, default=None,
                   help="fraction of weights kept in 16 bits (e.g. 0.01): rtn and gptq keep the most salient, "
                        "quantease moves them (Algorithm 3)")
    c.add_argument("--structured", action="store_true", help="with --outliers: whole columns")
    c.add_argument("--keep-columns", type=float, default=None,
                   help="GPTQ: fraction of input columns (largest activations) kept in 16 bits")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option for every layer (e.g. act_order=true)")
    c.add_argument("--calib-dataset", default="wikitext2", help="calibration text (default wikitext2)")
    c.add_argument("--calib-split", default="validation")
    if calibration:
        c.add_argument("--report", default=None, metavar="PATH",
                       help="write the per-layer reconstruction report (JSON) and print it")


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """--workers, --ray-address: the work split over Ray actors (``mixq.cluster``)."""
    g = p.add_argument_group("Ray (pip install 'mixq[ray]')")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray actors, each loading the model once: one per GPU on cuda, CPU actors otherwise "
                        "(--workers 1: one actor, to measure Ray's overhead)")
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join a running Ray cluster: auto (this node's) or ray://host:port (default: a local instance)")


def add_calibration_mode(p: argparse.ArgumentParser) -> None:
    """--calibration-mode: how calibrated solvers see their inputs."""
    p.add_argument("--calibration-mode", default="sequential", choices=["sequential", "independent"],
                   help="sequential (default): each block solved on the outputs of the quantized blocks before it; "
                        "independent: every layer on the base model's inputs, as a layer database (mixq search --db) "
                        "solves them")


def add_shared(p: argparse.ArgumentParser) -> None:
    """The options of the commands that load a causal LM, quantize it and evaluate it."""
    add_model_options(p)
    add_solver_options(p)


# -- settings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """Where and how a command runs, read once from its options."""

    device: str
    dtype: str
    batch_size: int
    seed: int


def setup_run(args: argparse.Namespace, *, cpu_batch: int = CPU_BATCH, cuda_batch: int = CUDA_BATCH) -> Run:
    """Device, dtype and batch size (defaults by device), validated; seeds torch."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MixqError("--device cuda: no CUDA device is available")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    batch = args.batch_size or (cuda_batch if device.startswith("cuda") else cpu_batch)
    if batch < 1:
        raise MixqError(f"--batch-size must be positive, got {batch}")
    if getattr(args, "seqlen", None) is not None and args.seqlen < 2:
        raise MixqError(f"--seqlen must be at least 2, got {args.seqlen}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise MixqError(f"--limit must be positive, got {args.limit}")
    torch.manual_seed(args.seed)
    return Run(device, dtype, batch, args.seed)


def cluster_of(args: argparse.Namespace, device: str):  # type: ignore[no-untyped-def]
    """The ``mixq.cluster.Cluster`` of --workers / --ray-address (Ray must be installed), or None."""
    if args.workers is None and args.ray_address is None:
        return None
    from mixq.cluster import Cluster, require_ray

    require_ray()
    return Cluster.for_device(device, workers=args.workers, address=args.ray_address)


def parse_size(text: str) -> int:
    """Bytes from ``100MB``, ``95MiB``, ``1.5GB`` or a plain number."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not m:
        raise MixqError(f"--max-size {text!r}: expected a size such as 100MB, 95MiB or 123456789")
    unit = m.group(2) or "b"
    scale = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """Solver options from --option KEY=VALUE, --outliers, --structured, --keep-columns."""
    import yaml

    opts: dict[str, Any] = {}
    for item in args.option:
        if "=" not in item:
            raise MixqError(f"--option {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        opts[k.strip()] = yaml.safe_load(v)
    if args.outliers is not None:
        opts["outliers"] = args.outliers
        if args.structured:
            opts["structured"] = True
    elif args.structured:
        raise MixqError("--structured needs --outliers")
    if args.keep_columns is not None:
        opts["keep_columns"] = args.keep_columns
    return opts


def plan_label(text: str) -> str:
    """How a plan given on the command line is named in tables: a file by its stem."""
    return Path(text).stem if Path(text).suffix else text


def parse_plans(values: list[str] | None, args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(label, plan) for every --plan (repeated or comma-separated; default base), with
    --solver and the solver options applied."""
    from mixq.plan import Plan

    names = [v.strip() for value in (values or ["base"]) for v in value.split(",") if v.strip()]
    opts = solver_options(args)
    return [(plan_label(n), Plan.parse(n).with_solver(args.solver, opts)) for n in names]


def calibration(args: argparse.Namespace, loaded: Any, plans: list[Any]):  # type: ignore[no-untyped-def]
    """Calibration windows when a plan's solver needs them (or a report is asked for)."""
    if not (getattr(args, "report", None) or any(p.needs_calibration() for p in plans)):
        return None
    from mixq.data import model_windows

    say(args, f"calibration: {args.nsamples} windows x {args.seqlen} tokens from {args.calib_dataset}/{args.calib_split} "
              f"(seed {args.seed})")
    return model_windows(loaded.model, loaded.tokenizer, args.calib_dataset, args.calib_split, args.seqlen,
                         root=args.data_dir, nsamples=args.nsamples, seed=args.seed)


def calibration_record(args: argparse.Namespace, calib: Any) -> dict[str, Any] | None:
    if calib is None:
        return None
    mode = ("independent: each layer sees the base model's inputs"
            if getattr(args, "calibration_mode", "sequential") == "independent"
            else "sequential: each block sees the outputs of the quantized blocks before it")
    return {"dataset": args.calib_dataset, "split": args.calib_split, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed, "mode": mode}


def write_report(args: argparse.Namespace, label: str, result: Any) -> None:
    """The per-layer reconstruction report of ``--report`` (JSON), and its table unless --json."""
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


def provenance_record(args: argparse.Namespace, identity: dict[str, str] | None, device: str) -> dict[str, Any]:
    from mixq.provenance import provenance

    return provenance(model=identity, seed=args.seed, device=device, command=getattr(args, "command_line", None))


def say(args: argparse.Namespace, msg: str) -> None:
    """A progress line: on stdout, or on stderr when stdout carries --json."""
    print(msg, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def load_for(args: argparse.Namespace, run: Run):  # type: ignore[no-untyped-def]
    from mixq.models import load_model

    say(args, f"loading {args.model} ({run.dtype}, {run.device})")
    return load_model(args.model, dtype=run.dtype, device=run.device)


__all__ = ["Run", "add_calibration_mode", "add_device_options", "add_model_options", "add_shared", "add_solver_options", "calibration",
           "calibration_record", "load_for", "parse_plans", "parse_size", "plan_label", "provenance_record", "say",
           "setup_run", "solver_options", "write_report", "add_cluster_options", "cluster_of"]
