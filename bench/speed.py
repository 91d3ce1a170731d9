"""Decode speed on low-bit kernels, and the latency model's prediction against measurement (CUDA).

    python bench/speed.py --out bench/results/speed [--smollm2 /root/models/smollm2.gguf]

For a Llama-3-8B-shaped model with random weights (built on the GPU), and for SmolLM2-135M
(its GGUF file, or the named model, or with --smollm2 random its shape with random weights):
every plan below is quantized with RTN, put on kernels (``apply_kernels``, backend auto)
and timed end to end (greedy decode on a static cache in a CUDA graph, batch 1 and 16;
prefill of 2048 tokens; peak memory).  Then every Linear shape x format x batch is timed
alone, the rest of the model is the base step minus its Linear layers, and each plan's
predicted step is compared with its measured one.  Writes OUT/speed.json and OUT/speed_h200.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from mixq.commands.bench_speed import table
from mixq.plan import LayerSpec, Plan
from mixq.provenance import provenance
from mixq.runtime.latency import LatencyModel, LatencyTable, device_key, linear_shapes, measure_layers, record_rest
from mixq.runtime.speed import plan_speed, random_model

ATTN = "re:.*self_attn\\..*"
MLP = "re:.*mlp\\..*"


def plans(blocks: int) -> dict[str, Plan]:
    """Uniform plans and mixed ones whose bytes lie between int4's and int8's."""
    half = tuple((f"re:model\\.layers\\.{i}\\..*", LayerSpec.of("int8")) for i in range(blocks // 2))
    return {
        "base": Plan(),
        "int8": Plan.uniform("int8"),
        "int4-g128": Plan.uniform("int4-g128"),
        "int4-g32": Plan.uniform("int4-g32"),
        "attn8-mlp4": Plan(rules=((ATTN, LayerSpec.of("int8")),), default=LayerSpec.of("int4-g128")),
        "down8-rest4": Plan(rules=(("re:.*mlp\\.down_proj", LayerSpec.of("int8")),), default=LayerSpec.of("int4-g128")),
        "half8-half4": Plan(rules=half, default=LayerSpec.of("int4-g128")),
        "mlp8-attn4": Plan(rules=((MLP, LayerSpec.of("int8")),), default=LayerSpec.of("int4-g128")),
    }


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def formats_of(plan_set: dict[str, Plan]) -> list[str]:
    out = []
    for p in plan_set.values():
        for spec in [s for _, s in p.rules] + ([p.default] if p.default else []):
            if spec.format.name not in out:
                out.append(spec.format.name)
    return out


def bench_model(key: str, base: torch.nn.Module, chosen: list[str], args: argparse.Namespace, table_: LatencyTable) -> dict:
    batches = tuple(args.batches)
    plan_set = {k: v for k, v in plans(base.config.num_hidden_layers).items() if k in chosen}
    rows = []
    for name, plan in plan_set.items():
        say(f"{key}: {name}")
        model = copy.deepcopy(base)
        row = plan_speed(model, plan, batches=batches, prompt=args.prompt, steps=args.new_tokens,
                         prefill=args.prefill if name in args.prefill_plans else 0, backend="auto", log=say)
        rows.append({"plan": name, **row})
        del model
        torch.cuda.empty_cache()
    say(f"{key}: layer latencies")
    shapes = linear_shapes(base)
    measure_layers(table_, shapes.values(), formats_of(plan_set), batches, backend="auto", log=say if args.verbose else None)
    base_row = rows[0]
    assert base_row["plan"] == "base", "the first plan is the base"
    validation = []
    for b in batches:
        rest = record_rest(table_, shapes, model_key=key, batch=b,
                           base_step_seconds=base_row["decode"][str(b)]["ms_per_step"] / 1000)
        lm = LatencyModel.for_model(table_, base, model_key=key, batch=b)
        for r in rows:
            pred = lm.predict(plan_set[r["plan"]])
            meas = r["decode"][str(b)]["ms_per_step"] / 1000
            validation.append({"plan": r["plan"], "batch": b, "measured_ms": 1000 * meas, "predicted_ms": 1000 * pred,
                               "error_percent": 100 * (pred / meas - 1), "rest_ms": 1000 * rest})
        say(f"{key}: batch {b}: rest of the model {1000 * rest:.3f} ms/step")
    return {"rows": rows, "validation": validation}


def markdown(result: dict, command: str) -> str:
    prov = result["provenance"]
    lines = [f"# Decode speed on low-bit kernels ({prov['device']})", "",
             f"`{command}`", "",
             f"{prov['date']}, torch {prov['versions']['torch']}, transformers {prov['versions']['transformers']}, "
             f"gemlite {result['gemlite']}.  Greedy decode of {result['new_tokens']} tokens after a {result['prompt']}-token "
             "prompt on a static cache, one CUDA graph per step (the same for every row); prefill of "
             f"{result['prefill']} tokens eager; plans solved with RTN, layers on kernels by `apply_kernels` (auto: "
             "tinygemm for int4, gemlite where installed for int8); tok/s at batch 16 counts all 16 sequences.", ""]
    for key, part in result["models"].items():
        lines += [f"## {key}", "", table(part["rows"], tuple(result["batches"])), "",
                  "| plan | size GiB | " + " | ".join(f"b{b} measured ms | b{b} predicted ms | b{b} error" for b in result["batches"]) + " |",
                  "|---|---|" + "---|---|---|" * len(result["batches"])]
        for r in part["rows"]:
            cells = [r["plan"], f"{r['size_bytes'] / 2**30:.2f}"]
            for b in result["batches"]:
                v = next(x for x in part["validation"] if x["plan"] == r["plan"] and x["batch"] == b)
                cells += [f"{v['measured_ms']:.3f}", f"{v['predicted_ms']:.3f}", f"{v['error_percent']:+.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        errs = [abs(v["error_percent"]) for v in part["validation"] if v["plan"] != "base"]
        if errs:
            lines += ["", f"Latency model: mean |error| {sum(errs) / len(errs):.1f}%, max {max(errs):.1f}% over "
                          f"{len(errs)} (plan, batch) pairs (the base is exact by construction: it defines the rest)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for speed.json and speed_h200.md")
    ap.add_argument("--smollm2", default="smollm2-135m", help="SmolLM2's GGUF file, the named model, 'random' or 'skip'")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the 8B-shaped model (default all 32)")
    ap.add_argument("--plans", default=",".join(plans(2)), help="subset of the plans (base first)")
    ap.add_argument("--prefill-plans", default="base,int8,int4-g128,attn8-mlp4,half8-half4",
                    help="plans whose 2048-token prefill is timed")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--verbose", action="store_true", help="print every layer latency")
    ap.add_argument("--gemlite-config", default=None, help="gemlite autotune results to load (saved to OUT/gemlite_config.json)")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prefill_plans = set(args.prefill_plans.split(","))
    chosen = args.plans.split(",")
    if not torch.cuda.is_available():
        sys.exit("bench/speed.py measures GPU speed: no CUDA device is visible")
    try:
        import gemlite

        gemlite_version = gemlite.__version__
        if args.gemlite_config and Path(args.gemlite_config).is_file():
            gemlite.load_config(args.gemlite_config)
            say(f"loaded gemlite autotune results from {args.gemlite_config}")
    except ImportError:
        gemlite_version = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.argv])
    table_ = LatencyTable(device_key())
    models = {}
    if not args.skip_8b:
        say("building the Llama-3-8B-shaped model")
        base = random_model("llama3-8b", device="cuda", layers=args.layers)
        models["llama3-8b (random weights)"] = bench_model("llama3-8b", base, chosen, args, table_)
        del base
        torch.cuda.empty_cache()
    if args.smollm2 != "skip":
        if args.smollm2 == "random":
            base = random_model("smollm2-135m", device="cuda")
        else:
            from mixq.models import load_model

            base = load_model(args.smollm2, dtype="bfloat16", device="cuda").model
        label = "smollm2-135m (random weights)" if args.smollm2 == "random" else f"smollm2-135m ({args.smollm2})"
        models[label] = bench_model("smollm2-135m", base, chosen, args, table_)
    result = {"models": models, "batches": args.batches, "new_tokens": args.new_tokens, "prompt": args.prompt,
              "prefill": args.prefill, "gemlite": gemlite_version, "latency_table": {table_.device: table_.to_dict()},
              "provenance": provenance(model=None, seed=0, device="cuda", command=command)}
    if gemlite_version:
        gemlite.cache_config(str(out / "gemlite_config.json"))  # autotuning takes minutes: reuse it with --gemlite-config
    (out / "speed.json").write_text(json.dumps(result, indent=1))
    table_.save(out / "latency_table.json")
    (out / "speed_h200.md").write_text(markdown(result, command))
    print(markdown(result, command), flush=True)
    say(f"wrote {out}/speed.json, speed_h200.md, latency_table.json ({datetime.datetime.now().isoformat(timespec='seconds')})")


if __name__ == "__main__":
    main()
