"""``mixq quantize``: quantize a model with a plan and save the fake-quantized model, its codes and the plan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixq.commands.common import (add_calibration_mode, add_shared, calibration, calibration_record, plan_label,
                                  provenance_record, say, setup_run, solver_options, write_report)

NAME = "quantize"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="quantize a model with a plan and save it")
    p.add_argument("--plan", required=True, help="plan file (.yaml/.json) or preset (e.g. int4-g128)")
    p.add_argument("--out", required=True, help="output folder")
    add_shared(p)
    add_calibration_mode(p)
    return p


def save_codes(result: Any, path: Path) -> None:
    """Every quantized tensor's integer codes, group parameters and 16-bit outliers (CSR), unpacked."""
    import torch
    from safetensors.torch import save_file

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
    meta = {n: json.dumps({"format": l.qtensor.fmt, "group_size": l.qtensor.group_size}) for n, l in result.layers.items()}
    save_file(tensors, str(path), metadata=meta)


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of a model whose weights are plain tensors.

    transformers marks a model loaded from a GGUF file as quantized with "gguf" (its weights
    were dequantised at load) and refuses to save it; after mixq's fake quantization the
    weights are ordinary dense tensors, so the marker is lifted while saving and put back.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    marker = getattr(config, "quantization_config", None)
    gguf = quantizer is not None and "gguf" in str(getattr(quantizer.quantization_config, "quant_method", "")).lower()
    if gguf:
        model.hf_quantizer = None
        del config.quantization_config
    try:
        model.save_pretrained(folder)
    finally:
        if gguf:
            model.hf_quantizer = quantizer
            config.quantization_config = marker
    tokenizer.save_pretrained(folder)


def run(args: argparse.Namespace) -> int:
    from mixq.errors import PlanError
    from mixq.models import load_for_quantize
    from mixq.plan import Plan
    from mixq.quantize import quantize_

    run_ = setup_run(args)
    plan = Plan.parse(args.plan).with_solver(args.solver, solver_options(args))
    out = Path(args.out)
    say(args, f"loading {args.model} ({run_.dtype}, {run_.device})")
    loaded = load_for_quantize(args.model, dtype=run_.dtype, device=run_.device)  # keeps a classification head
    report = plan.size_report(loaded.model)  # validates the plan before any work
    if not report.layers:
        raise PlanError(f"plan {plan.describe()!r} quantizes no layer of this model: nothing to save")
    calib = calibration(args, loaded, [plan])
    result = quantize_(loaded.model, plan, calibration=calib, device=run_.device, batch_size=run_.batch_size,
                       progress=not args.json, log=lambda m: say(args, m), calibration_mode=args.calibration_mode)
    write_report(args, plan_label(args.plan), result)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.yaml")
    save_codes(result, out / "codes.safetensors")
    save_model(loaded.model, loaded.tokenizer, out / "model")
    record = {"plan": plan.describe(), **report.to_dict(), "quantize_seconds": result.seconds, "out": str(out),
              "calibration": calibration_record(args, calib),
              "provenance": provenance_record(args, loaded.identity(), run_.device)}
    (out / "result.json").write_text(json.dumps(record, indent=2))
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{plan.describe()}: {report.bits_per_weight:.4f} bits/weight, {report.size_bytes:,} bytes -> {out}")
        print(f"  {out / 'model'}: fake-quantized Hugging Face model (mixq eval --model {out / 'model'})")
        print(f"  {out / 'codes.safetensors'}: integer codes and group parameters per layer")
    return 0
