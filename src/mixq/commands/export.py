"""``mixq export``: quantize a model with a plan and write it packed, as compressed-tensors
(vLLM, transformers), mixq's own checkpoint (every format) or GGUF (llama.cpp)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from mixq.commands.common import (add_shared, calibration, calibration_record, load_for, plan_label, provenance_record, say,
                                  setup_run, solver_options, write_report)
from mixq.errors import ExportError

NAME = "export"
FORMATS = ("compressed-tensors", "mixq", "gguf")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="quantize a model with a plan and write a packed checkpoint")
    p.add_argument("--plan", required=True, help="plan file (.yaml/.json) or preset (e.g. int4-g128)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors: pack-quantized integer schemes (vLLM, transformers); mixq: every format, "
                        "read back by mixq.load / mixq eval --model; gguf: llama.cpp")
    p.add_argument("--out", required=True, help="output folder (a .gguf file with --format gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output")
    p.add_argument("--fallback-16bit", action="store_true",
                   help="compressed-tensors and gguf: write the layers the target cannot hold (non-integer formats, short last groups, "
                        "outliers, q/k/v or gate/up with different schemes) in 16 bits instead of refusing the plan")
    add_shared(p)
    return p


def run(args: argparse.Namespace) -> int:
    from mixq.export.atomic import check_target
    from mixq.plan import Plan
    from mixq.quantize import quantize_

    if args.format == "gguf" and importlib.util.find_spec("mixq.export.gguf") is None:
        raise ExportError("GGUF export is not available in this build")
    if args.fallback_16bit and args.format == "mixq":
        raise ExportError("--fallback-16bit applies to --format compressed-tensors and gguf (mixq's checkpoint holds "
                          "every format)")
    run_ = setup_run(args)
    device, batch = run_.device, run_.batch_size
    plan = Plan.parse(args.plan).with_solver(args.solver, solver_options(args))
    out = Path(args.out)
    if args.format == "gguf":
        if out.exists() and not args.overwrite:
            raise ExportError(f"{out} exists; pass --overwrite to replace it")
    else:
        check_target(out, overwrite=args.overwrite)
    loaded = load_for(args, run_)
    report = plan.size_report(loaded.model)  # validates the plan before any work
    if args.format == "compressed-tensors":
        from mixq.export.compressed_tensors import resolve

        resolve(loaded.model, plan.resolve(loaded.model), fallback_16bit=args.fallback_16bit)  # refuses before solving
    calib = calibration(args, loaded, [plan])
    result = quantize_(loaded.model, plan, calibration=calib, device=device, batch_size=batch,
                       progress=not args.json, log=lambda m: say(args, m))
    write_report(args, plan_label(args.plan), result)
    written = _write(args, loaded, result, plan, out)
    record = {"plan": plan.describe(), **report.to_dict(), **written, "quantize_seconds": result.seconds,
              "calibration": calibration_record(args, calib),
              "provenance": provenance_record(args, loaded.identity(), device)}
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{plan.describe()}: {report.bits_per_weight:.4f} bits/weight -> {out} ({args.format})")
    if "tensor_bytes" in written:
        print(f"  tensors on disk {written['tensor_bytes']:,} bytes, the plan counts {written['plan_bytes']:,} "
              f"({written['size_ratio']:.4f}x); other files {written['other_bytes']:,} bytes")
    if written.get("fallback_16bit"):
        print(f"  in 16 bits (--fallback-16bit): {len(written['fallback_16bit'])} layers: "
              + ", ".join(written["fallback_16bit"]))
    for note in written.get("notes", []):
        print(f"  note: {note}")
    if "transformers" in written:
        print(f"  transformers: {written['transformers']}")
    print(f"  read back: mixq eval --model {out}")
    return 0


def _write(args: argparse.Namespace, loaded: Any, result: Any, plan: Any, out: Path) -> dict[str, Any]:
    if args.format == "mixq":
        from mixq.export import export_checkpoint

        return export_checkpoint(loaded.model, result, plan, out, tokenizer=loaded.tokenizer,
                                 overwrite=args.overwrite).to_dict()
    if args.format == "compressed-tensors":
        from mixq.export.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(loaded.model, result, plan, out, tokenizer=loaded.tokenizer,
                                         fallback_16bit=args.fallback_16bit, overwrite=args.overwrite).to_dict()
    from mixq.export.gguf import export_gguf

    source = loaded.source.path if loaded.source.is_gguf else None
    written = export_gguf(loaded.model, result.layers, loaded.tokenizer, out, source_gguf=source,
                          float_fallback=args.fallback_16bit, overwrite=args.overwrite)
    plan_bytes = plan.size_bytes(loaded.model)
    return {"format": "gguf", "out": str(written.path), "file_bytes": written.size_bytes, "plan_bytes": plan_bytes,
            "size_ratio": written.size_bytes / plan_bytes, "types": written.types,
            "fallback_16bit": list(written.in_float)}
