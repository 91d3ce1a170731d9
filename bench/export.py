"""Export SmolLM2-135M packed and read it back: size on disk against the plan's count, and
perplexity of the reloaded model against mixq's in-memory fake-quantized one.

    PYTHONPATH=src python bench/export.py --data-dir DATA --limit 4 --seqlen 512 --out bench/results/export_cpu

For each plan the model is loaded in float16 (the export dtype), quantized with RTN and
written as mixq's checkpoint and as compressed-tensors (pack-quantized).  Each folder is
read back (compressed-tensors through transformers where transformers can load it, else
through ``mixq.load``, which runs compressed-tensors' decompressor layer by layer) and
scored on the first ``--limit`` WikiText-2 test windows; the models run in float32 (float16
matmuls are slow on CPU), every one upcast from the same float16 weights.

A plan compressed-tensors cannot hold is reported with its refusals by reason, then
written with ``--fallback-16bit`` (those layers in 16 bits) and, for the mixed plan, also
as its nearest expressible plan: per layer the same bits, ``-fmin`` grids as integer zero
points, groups of 128 on 576-wide rows as groups of 64, and each fused q/k/v or gate/up
group at its widest member's format.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import mixq
from mixq.data import load_text, tokenize, windows
from mixq.errors import ExportError
from mixq.evaluate import perplexity
from mixq.export import export_checkpoint
from mixq.export import compressed_tensors as ct
from mixq.formats import IntFormat
from mixq.models import load_model
from mixq.plan import LayerSpec, Plan
from mixq.provenance import provenance
from mixq.quantize import quantize_


def legalize(plan: Plan, model: torch.nn.Module) -> Plan:
    """The nearest plan compressed-tensors can hold (see the module docstring)."""
    specs = plan.resolve(model)
    out: dict[str, LayerSpec] = {}
    for name, spec in specs.items():
        f = spec.format
        if not isinstance(f, IntFormat) or f.scheme == "pow2":
            raise ExportError(f"{name}: {f.name} has no integer counterpart")
        cols = model.get_submodule(name).weight.shape[1]
        group = f.group_size
        while group is not None and cols % group:
            group //= 2
        out[name] = LayerSpec.of(IntFormat(f.bits, "sym" if f.scheme == "sym" else "asym", group, f.per_tensor))
    for fused in ct.fused_groups(model):
        present = [n for n in fused if n in out]
        widest = max((out[n] for n in present), key=lambda s: (s.format.bits, -(s.format.group_size or 10**9)))
        for n in present:
            out[n] = widest
    return Plan.per_layer(out)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def score(model: torch.nn.Module, win: torch.Tensor, batch: int) -> float:
    m = copy.deepcopy(model)
    for t in list(m.parameters()) + list(m.buffers()):  # .float() is refused on a model transformers loaded from GGUF
        if t.is_floating_point():
            t.data = t.data.float()
    return perplexity(m, win, batch_size=batch).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--plans", default="int8,int4-g128,int4-g64,bench/results/allocate_3.5bits.yaml")
    ap.add_argument("--limit", type=int, default=4, help="WikiText-2 test windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--work-dir", default="runs/export_bench", help="where the checkpoints are written")
    ap.add_argument("--out", required=True, help="results stem: OUT.json and OUT.md")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.render:
        Path(args.out).with_suffix(".md").write_text(render(json.loads(Path(args.out).with_suffix(".json").read_text())))
        return
    torch.set_grad_enabled(False)
    work = Path(args.work_dir)
    base = load_model(args.model, dtype="float16")
    win = windows(tokenize(base.tokenizer, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen, limit=args.limit)
    rows: list[dict[str, Any]] = []

    def run(label: str, plan: Plan, formats: tuple[str, ...]) -> None:
        model = copy.deepcopy(base.model)
        t = time.perf_counter()
        result = quantize_(model, plan)
        row: dict[str, Any] = {"plan": label, "bits_per_weight": plan.bits(model), "plan_bytes": plan.size_bytes(model),
                               "quantize_seconds": time.perf_counter() - t, "ppl_fake_quant": score(model, win, args.batch_size)}
        print(f"{label}: {row['bits_per_weight']:.3f} bits/weight, fake-quant ppl {row['ppl_fake_quant']:.4f}", flush=True)
        for fmt in formats:
            if fmt == "compressed-tensors+fallback" and "refusals" not in row.get("compressed-tensors", {}):
                continue  # nothing to fall back from
            out = work / f"{label.replace(' ', '_')}-{fmt}"
            try:
                if fmt == "mixq":
                    rep = export_checkpoint(model, result, plan, out, tokenizer=base.tokenizer, overwrite=True)
                else:
                    rep = ct.export_compressed_tensors(model, result, plan, out, tokenizer=base.tokenizer, overwrite=True,
                                                       fallback_16bit=fmt == "compressed-tensors+fallback")
            except ExportError:
                reasons: dict[str, int] = {}
                for c in ct.check_layers(model, plan.resolve(model)):
                    if c.scheme is None:  # by kind: a fused group's reason without its members' schemes
                        kind = (c.reason or "").split(" (")[0]
                        reasons[kind] = reasons.get(kind, 0) + 1
                row[fmt] = {"refusals": reasons, "refused_layers": sum(reasons.values())}
                print(f"  {fmt}: refused ({row[fmt]['refused_layers']} layers)", flush=True)
                continue
            path = rep.extra.get("transformers", "mixq.load(DIR)")
            if path.startswith("AutoModelForCausalLM"):
                from transformers import AutoModelForCausalLM, CompressedTensorsConfig

                kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "dequantize" in path else {}
                reloaded, how = AutoModelForCausalLM.from_pretrained(out, **kw).eval(), "transformers"
            else:
                reloaded, how = mixq.load(str(out)).model, "mixq.load"
            ppl = score(reloaded, win, args.batch_size)
            row[fmt] = {**rep.to_dict(), "reloaded_by": how, "ppl_reloaded": ppl}
            print(f"  {fmt}: {rep.tensor_bytes:,} bytes ({rep.size_ratio:.4f}x the plan's {rep.plan_bytes:,}), "
                  f"reloaded by {how}: ppl {ppl:.4f}", flush=True)
        rows.append(row)

    for text in args.plans.split(","):
        plan = Plan.parse(text)
        label = Path(text).stem if Path(text).suffix else text
        run(label, plan, ("mixq", "compressed-tensors", "compressed-tensors+fallback"))
        if Path(text).suffix:
            legal = legalize(plan, base.model)
            run(f"{label} (legalized)", legal, ("mixq", "compressed-tensors"))
    record = {"rows": rows, "limit": args.limit, "seqlen": args.seqlen, "export_dtype": "float16",
              "compressed_tensors": metadata.version("compressed-tensors"),
              "cpu": cpu_name(),
              "provenance": provenance(model=base.identity(), seed=0, device="cpu",
                                       command=shlex.join(["python", *sys.argv]))}
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1))
    Path(args.out).with_suffix(".md").write_text(render(record))


def render(record: dict[str, Any]) -> str:
    prov = record["provenance"]
    lines = [f"# Export of SmolLM2-135M: size on disk and perplexity of the reloaded checkpoints (CPU, {prov['date'][:10]})",
             "", f"Command: `PYTHONPATH=src {prov['command']}`", "",
             f"On {record['cpu']} (shared with other jobs), torch {prov['versions']['torch']}, transformers "
             f"{prov['versions']['transformers']}, compressed-tensors {record['compressed_tensors']}. Model loaded and exported in float16, RTN; perplexity on the first "
             f"{record['limit']} WikiText-2 test windows of {record['seqlen']} tokens, every model run in float32 "
             "(upcast from its float16 weights). Bytes: the .safetensors files; the plan counts codes, scales, zero "
             "points and every other tensor at 16 bits.", "",
             "| plan | bits/weight | plan bytes | export | bytes on disk | / plan | reloaded by | ppl reloaded | ppl fake-quant |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        for fmt in ("mixq", "compressed-tensors", "compressed-tensors+fallback"):
            e = r.get(fmt)
            if e is None:
                continue
            head = f"| {r['plan']} | {r['bits_per_weight']:.3f} | {r['plan_bytes']:,} | {fmt} |"
            if "refusals" in e:
                lines.append(f"{head} refused: {e['refused_layers']} layers | | | | {r['ppl_fake_quant']:.4f} |")
                continue
            fb = f" ({len(e['fallback_16bit'])} layers 16-bit)" if e["fallback_16bit"] else ""
            lines.append(f"{head} {e['tensor_bytes']:,}{fb} | {e['size_ratio']:.4f} | {e['reloaded_by']} | "
                         f"{e['ppl_reloaded']:.4f} | {r['ppl_fake_quant']:.4f} |")
    done = [(r, e) for r in record["rows"] for f, e in r.items() if isinstance(e, dict) and "ppl_reloaded" in e]
    worst = max(abs(e["ppl_reloaded"] - r["ppl_fake_quant"]) for r, e in done)
    ratios = [e["size_ratio"] for _, e in done if e["format"] == "mixq"]
    lines += ["", f"Largest |ppl reloaded − ppl fake-quant| over the {len(done)} reloaded checkpoints: {worst:.2g}. "
              f"mixq's checkpoints take {min(ratios):.4f}-{max(ratios):.4f}× the plan's computed size (the rest is "
              "safetensors headers and bytes rounded per tensor); compressed-tensors adds a weight_shape per layer, pads "
              "rows to whole 32-code words, and its refused layers, written with --fallback-16bit, cost 16 bits a weight."]
    lines += ["", "Why compressed-tensors refused (layers per reason):", ""]
    for r in record["rows"]:
        for reason, n in r.get("compressed-tensors", {}).get("refusals", {}).items():
            lines.append(f"- {r['plan']}: {n} × {reason}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
