"""Join the solver bench runs (bench/results/solvers_*_h100.json[l]) into one table with
the GPTQ authors' reference numbers beside ours.

    python bench/summarize_solvers.py > bench/results/solvers_h100.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# measured with IST-DASLab/gptq (gptq.py + quant.py) on an H100, same model, fp16, 128 x 2048
# validation windows, full test at 2048 (the table); RTN g128 there wrapped across rows
REFERENCE = {("int4", "rtn"): 38.98, ("int4", "gptq"): 38.74, ("int4-g128", "rtn"): 29.60, ("int4-g128", "gptq"): 30.15,
             ("int4-g128", "gptq act_order=True static_groups=True"): 28.77, ("int4-g32", "rtn"): 26.92,
             ("int4-g32", "gptq"): 28.17, ("int3", "rtn"): 682.2, ("int3", "gptq"): 166.6, ("int3-g128", "rtn"): 125.8,
             ("int3-g128", "gptq"): 79.95, ("int3-g128", "gptq act_order=True static_groups=True"): 55.90,
             ("int3-g64", "rtn"): 77.37, ("int3-g64", "gptq"): 68.12, ("int3-g32", "rtn"): 56.60,
             ("int3-g32", "gptq"): 55.40, ("int2-g64", "rtn"): 7.7e5, ("int2-g64", "gptq"): 9521}


def rows() -> list[dict]:
    out = []
    for path in sorted(RESULTS.glob("solvers_*_h100.json*")):
        if path.suffix == ".jsonl" and path.with_suffix(".json").is_file():
            continue  # the .json holds the same rows (written at the end of the run)
        run = int(path.name.split("_")[1])
        if path.suffix == ".jsonl":
            new = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            new = json.loads(path.read_text())["rows"]
        out += [{**r, "run": run} for r in new]
    return out


def _reference_rows() -> list[dict]:
    out = []
    for path in sorted(RESULTS.glob("gptq_reference_*_h100.json")):
        doc = json.loads(path.read_text())
        out += [{**r, "seed": r.get("seed", doc["seed"]), "file": path.name} for r in doc["rows"]]
    return out


def _opts(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in r["options"].items())


def must_show(all_rows: list[dict]) -> list[str]:
    """The issue's table: four settings x four solvers, from the latest run that has each."""
    settings = [("int4", {}), ("int4-g128", {}), ("int3-g128", {}), ("int3-g128", {"outliers": 0.01})]
    solvers = ["rtn", "gptq", "quantease", "gptq+quantease"]
    latest: dict[tuple, dict] = {}
    for r in all_rows:
        if r.get("true_sequential", True) and not r.get("seed") and r.get("fused", True) and not r.get("profiled"):
            latest[(r["format"], r["solver"], _opts(r))] = r
    lines = ["| setting | solver | ppl | bits/weight | quantize s (whole model) | run |", "|---|---|---|---|---|---|"]
    for fmt, extra in settings:
        opts = " ".join(f"{k}={v}" for k, v in extra.items())
        for solver in solvers:
            r = latest.get((fmt, solver, opts))
            label = fmt + (" + 1% outliers" if extra else "")
            if r is None:
                lines.append(f"| {label} | {solver} | not run | | | |")
            else:
                lines.append(f"| {label} | {solver} | {r['ppl']:.2f} | {r['bits_per_weight']:.4f} | "
                             f"{r['quantize_seconds']:.1f} | {r['run']} |")
    return lines


def reference_table(refs: list[dict]) -> list[str]:
    by: dict[str, dict[int, dict]] = {}
    for r in refs:
        by.setdefault(r["format"], {})[r["seed"]] = r
    lines = ["| grid | draw | reference ppl | ours ppl | ours / reference - 1 | reference s | ours s |",
             "|---|---|---|---|---|---|---|"]
    for fmt, seeds in by.items():
        for seed, r in sorted(seeds.items()):
            lines.append(f"| {fmt} | {seed} | {r['ref_ppl']:.2f} | {r['ours_ppl']:.2f} | {r['rel_gap']:+.1%} | "
                         f"{r['ref_seconds']:.1f} | {r['ours_seconds']:.1f} |")
        if len(seeds) > 1:
            ref = sum(r["ref_ppl"] for r in seeds.values()) / len(seeds)
            ours = sum(r["ours_ppl"] for r in seeds.values()) / len(seeds)
            lines.append(f"| {fmt} | mean of {len(seeds)} | {ref:.2f} | {ours:.2f} | {ours / ref - 1:+.1%} | | |")
    return lines


def main() -> None:
    all_rows = rows()
    refs = _reference_rows()
    ref_s = [r["ref_seconds"] for r in refs]
    sweeps_file = sorted(RESULTS.glob("fused_sweeps_*_h100.json"))[-1]
    sweeps = json.loads(sweeps_file.read_text())["rows"]
    speedups: dict[str, list[float]] = {}
    for r in sweeps:
        speedups.setdefault("GPTQ" if r["solver"] == "gptq" else "QuantEase (30 sweeps)", []).append(r["speedup"])
    identical = all(r.get("identical") for r in sweeps)
    print("# Calibrated solvers on SmolLM2-135M, one NVIDIA H100 80GB HBM3 (2026-11-25)\n")
    print("Commands: `PYTHONPATH=src python3 bench/solvers.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data-dir DATA "
          "--settings ...` (fp16, calibration 128 × 2048 windows of the WikiText-2 validation split drawn with "
          "`random.seed(SEED)` + `randint`, full test perplexity at 2048, base 21.6106 = the GGUF's dequantised "
          "weights, true-sequential), `PYTHONPATH=src python3 bench/gptq_reference.py --settings ...` (the GPTQ "
          "authors' pipeline and ours in one process on the same draw) and `PYTHONPATH=src python3 "
          "bench/fused_sweeps.py`; then `python3 bench/summarize_solvers.py`. Raw rows: `solvers_N_h100.json[l]`, "
          "`gptq_reference_N_h100.json`, `fused_sweeps_N_h100.json`.\n")
    print("## The four settings × four solvers (latest run of each)\n")
    print("Runs 5 and 6 use the fused Triton column sweeps (`src/mixq/solvers/kernels.py`). Outliers: 1% of the "
          "weights in 16 bits with their column indices (CSR), counted in bits/weight; RTN and GPTQ keep the most "
          "salient weights (|W|·√diag(Σ); RTN, data-free, |W|) and quantize the rest, QuantEase moves them "
          "(Algorithm 3).\n")
    print("\n".join(must_show(all_rows)) + "\n")
    print("## Speed\n")
    print("Whole-model GPTQ (int4-g128, 128 × 2048 windows, calibration forward passes included) in run 5: "
          + ", ".join(f"{'fused' if r.get('fused', True) else 'eager'} {r['quantize_seconds']:.1f} s"
                      + (" (under cProfile)" if r.get("profiled") else "")
                      for r in all_rows if r["run"] == 5 and r["format"] == "int4-g128" and r["solver"] == "gptq")
          + f". The GPTQ authors' pipeline on the same machine takes {min(ref_s):.0f}-{max(ref_s):.0f} s per run (table "
          f"below). Per layer, `{sweeps_file.name}`: the fused sweeps are "
          + " and ".join(f"{min(v):.1f}-{max(v):.1f}× faster than the eager loop for {k}" for k, v in speedups.items())
          + (", with bit-identical results on those layers.\n" if identical else ".\n"))
    print("## Against the GPTQ authors' code, same calibration draws\n")
    print("`bench/gptq_reference.py`: both pipelines not true-sequential (the reference's default, with which the "
          "issue's reference numbers were measured: draw 0 reproduces them), fp16 model, the same windows. One draw "
          "says little: the two pipelines differ only in float details (our scales are stored in fp16, our groups "
          "are fitted on the columns GPTQ has already updated), yet single-draw gaps reach ±10% both ways at 3 bits; "
          "compare means over draws.\n")
    print("\n".join(reference_table(refs)) + "\n")
    print("## Every run\n")
    print("Runs 0-3 predate a fix of the calibration pipeline: layers were grouped by the address of their input "
          "tensor, and a freed input's memory could be reused by the next layer's different input, so o_proj and "
          "gate/up_proj of a Llama block sometimes shared one Gram (o_proj's). Run 0 predates the fused integer "
          "rounding. Run 5's fused kernel still fused multiply-adds (not bit-identical to the eager loop); run 6's "
          "rounds as the eager loop. GPTQ's perplexity moves by several percent with any last-bit change (run 5: "
          "int4-g128 30.01 eager vs 32.01 fused with multiply-adds; run 6: 31.05), so read single rows as one "
          "sample.\n")
    print("| run | format | solver | options | ppl | reference | bits/weight | quantize s (whole model) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in all_rows:
        opts = _opts(r)
        key = (r["format"], f"{r['solver']} {opts}".strip())
        extra = ([] if r.get("true_sequential", True) else ["not true-sequential"]) + \
                ([f"calibration seed {r['seed']}"] if r.get("seed") else []) + \
                ([] if r.get("fused", True) else ["eager loop"]) + (["under cProfile"] if r.get("profiled") else [])
        ref = REFERENCE.get(key) if not extra else None
        print(f"| {r['run']} | {r['format']} | {r['solver']} | {', '.join([opts] * bool(opts) + extra)} | {r['ppl']:.2f} | "
              f"{'' if ref is None else f'{ref:g}'} | {r['bits_per_weight']:.4f} | {r['quantize_seconds']:.1f} |")


if __name__ == "__main__":
    main()
