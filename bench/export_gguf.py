"""GGUF export of SmolLM2-135M: size on disk against the plan's, and the perplexity of the
exported file reloaded by transformers (and by llama.cpp, through llama-cpp-python, when
``--llama-python`` names an interpreter that has it) against mixq's in-memory fake-quantized
model, on WikiText-2 test windows.

    PYTHONPATH=src python bench/export_gguf.py --data-dir DATA --windows 2 --seqlen 1024 --threads 1 --out bench/results/export_gguf_cpu \\
        [--llama-python /path/to/venv/bin/python --presets Q4_K_M,Q3_K_M]

Plans (RTN; the embedding in int8-sym-g32, which reproduces the source's Q8_0 table exactly):
``q8_0`` every Linear int8-sym-g32; ``q4_1`` int4-fmin-g32 (SmolLM2's own grid: lossless);
``q5_0+q4_k`` int5-sym-g32 with ffn_down in q4-k (576-wide rows cannot be k-quants; llama.cpp
falls back to Q5_0 there too); ``q4_0+q3_k`` int4-sym-g32 with ffn_down in q3-k. With
``--presets``, llama.cpp's own quantizer (``llama_model_quantize``, no importance matrix)
writes those presets from an F32 export of the same base weights; they are scored the same
way, and their k-quant tensors are compared byte for byte with mixq's port of ggml's reference
quantizer on the same weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from mixq.data import load_text, tokenize, windows
from mixq.evaluate import perplexity
from mixq.export.gguf import export_gguf, llama_permute, pack
from mixq.formats import parse_format
from mixq.models import load_model
from mixq.plan import Plan
from mixq.provenance import provenance
from mixq.quantize import quantize_

EMBED = {"match": "model.embed_tokens", "format": "int8-sym-g32"}
PLANS = {
    "q8_0": {"default": {"format": "int8-sym-g32"}, "rules": [EMBED]},
    "q4_1": {"default": {"format": "int4-fmin-g32"}, "rules": [EMBED]},
    "q5_0+q4_k": {"default": {"format": "int5-sym-g32"}, "rules": [EMBED, {"match": "re:.*down_proj", "format": "q4-k"}]},
    "q4_0+q3_k": {"default": {"format": "int4-sym-g32"}, "rules": [EMBED, {"match": "re:.*down_proj", "format": "q3-k"}]},
}

#: run by --llama-python: perplexity of a GGUF file with llama.cpp on the given token windows
LLAMA_PPL = r"""
import json, sys, numpy as np, llama_cpp
path, ids_path = sys.argv[1], sys.argv[2]
ids = np.load(ids_path)
llm = llama_cpp.Llama(model_path=path, n_ctx=ids.shape[1], n_batch=ids.shape[1], logits_all=True, verbose=False)
nll, count = 0.0, 0
for row in ids:
    llm.reset()
    llm.eval(row.tolist())
    logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll -= logp[np.arange(len(row) - 1), row[1:]].sum()
    count += len(row) - 1
print(json.dumps({"ppl": float(np.exp(nll / count)), "tokens": count, "llama_cpp": llama_cpp.__version__}))
"""

LLAMA_QUANTIZE = r"""
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def llama_ppl(python: str, path: Path, ids_path: Path) -> dict:
    out = subprocess.run([python, "-c", LLAMA_PPL, str(path), str(ids_path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reload_ppl(path: Path, reference: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[float, float]:
    """(perplexity of the file through transformers' GGUF loader, max |weight − reference|)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    diff = max(float((v - reference[k]).abs().max()) for k, v in model.state_dict().items())
    return perplexity(model, ids, batch_size=1).ppl, diff


def same_kquants(path: Path, base) -> dict[str, int]:
    """How many of the file's k-quant tensors equal mixq's q{B}-k of the base weights, byte for byte."""
    config = base.config
    hf = {n: m for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    to_hf = {names.get_name(n): n for n in hf}
    counts = {"k-quant tensors": 0, "identical": 0}
    for t in gguf.GGUFReader(path).tensors:
        if not t.tensor_type.name.endswith("_K"):
            continue
        fmt = parse_format(f"q{t.tensor_type.name[1]}-k")
        weight = hf[to_hf[t.name.removesuffix(".weight")]].weight.detach()
        if ".attn_q." in t.name or ".attn_k." in t.name:
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            weight = torch.from_numpy(llama_permute(weight.numpy(), heads).copy())
        packed, _ = pack(fmt, fmt.quantize(weight))
        counts["k-quant tensors"] += 1
        counts["identical"] += int(np.array_equal(packed, np.asarray(t.data).reshape(packed.shape)))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--llama-python", default=None, help="an interpreter with llama-cpp-python")
    ap.add_argument("--presets", default="", help="llama.cpp presets to write and score (e.g. Q4_K_M,Q3_K_M)")
    ap.add_argument("--work", default=None, help="folder for the GGUF files (default: a temporary one)")
    ap.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="export_gguf_"))
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    source = loaded.source.path
    ids = windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen,
                  limit=args.windows)
    ids_path = work / "windows.npy"
    np.save(ids_path, ids.numpy().astype(np.int64))
    base_ppl = perplexity(loaded.model, ids, batch_size=1).ppl
    rows = []
    for name in [p for p in args.plans.split(",") if p]:
        m = load_model(args.model)
        plan = Plan.from_dict(PLANS[name])
        t = time.perf_counter()
        result = quantize_(m.model, plan)
        seconds = time.perf_counter() - t
        fake = perplexity(m.model, ids, batch_size=1).ppl
        out = export_gguf(m.model, result.layers, m.tokenizer, work / f"{name}.gguf", source_gguf=source, overwrite=True)
        reloaded, diff = reload_ppl(out.path, m.model.state_dict(), ids)
        reader = gguf.GGUFReader(out.path)
        row = {"plan": name, "formats": sorted({l.spec.format.name for l in result.layers.values()}),
               "gguf_types": sorted(set(out.types.values())), "quantize_seconds": round(seconds, 1),
               "plan_size_bytes": plan.size_bytes(m.model), "file_bytes": out.size_bytes,
               "tensor_bytes": sum(int(t.n_bytes) for t in reader.tensors), "header_bytes": int(reader.data_offset),
               "bits_per_weight": plan.bits(m.model), "ppl_fake_quant": fake, "ppl_gguf_transformers": reloaded,
               "max_abs_weight_diff": diff}
        if args.llama_python:
            row["ppl_gguf_llama_cpp"] = llama_ppl(args.llama_python, out.path, ids_path)["ppl"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    presets = []
    if args.presets and args.llama_python:
        m = load_model(args.model)
        base_file = export_gguf(m.model, {}, m.tokenizer, work / "base-f32.gguf", source_gguf=source,
                                float_type="f32", keep_source_types=False, overwrite=True).path
        for preset in [p for p in args.presets.split(",") if p]:
            path = work / f"llama-{preset}.gguf"
            subprocess.run([args.llama_python, "-c", LLAMA_QUANTIZE, str(base_file), str(path), preset], check=True,
                           capture_output=True)
            reloaded, _ = reload_ppl(path, m.model.state_dict(), ids)
            reader = gguf.GGUFReader(path)
            kinds: dict[str, int] = {}
            for t in reader.tensors:
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            row = {"preset": preset, "file_bytes": path.stat().st_size, "tensor_types": kinds,
                   "ppl_gguf_transformers": reloaded, "ppl_gguf_llama_cpp": llama_ppl(args.llama_python, path, ids_path)["ppl"],
                   "kquants_vs_mixq": same_kquants(path, m.model)}
            presets.append(row)
            print(json.dumps(row), flush=True)
    record = {"provenance": provenance(model=loaded.identity(), seed=0, device="cpu"),
              "cpu": platform.processor() or platform.machine(), "windows": args.windows, "seqlen": args.seqlen,
              "base_ppl": base_ppl, "plans": rows, "llama_cpp_presets": presets}
    out_json = Path(args.out).with_suffix(".json")
    out_json.write_text(json.dumps(record, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(render(record))


def render(r: dict) -> str:
    p = r["provenance"]
    lines = [f"# GGUF export of SmolLM2-135M (CPU, {p['date'][:10]})", "",
             f"Command: `{p['command']}` on {r['cpu']} (2 cores); gguf {p['versions']['gguf']}, "
             f"transformers {p['versions']['transformers']}, torch {p['versions']['torch']}.",
             f"Perplexity on the first {r['windows']} WikiText-2 test windows of {r['seqlen']} tokens; "
             f"base model (the source GGUF's dequantised weights): {r['base_ppl']:.4f}.", "",
             "| plan | formats | GGUF types | plan size (B) | file (B) | header (B) | tensors (B) | ppl mixq fake-quant | "
             "ppl GGUF (transformers) | max weight diff | ppl GGUF (llama.cpp) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["plans"]:
        lc = f"{row['ppl_gguf_llama_cpp']:.4f}" if "ppl_gguf_llama_cpp" in row else "not run"
        lines.append(f"| {row['plan']} | {', '.join(row['formats'])} | {', '.join(row['gguf_types'])} | "
                     f"{row['plan_size_bytes']:,} | {row['file_bytes']:,} | {row['header_bytes']:,} | {row['tensor_bytes']:,} | "
                     f"{row['ppl_fake_quant']:.4f} | {row['ppl_gguf_transformers']:.4f} | {row['max_abs_weight_diff']:g} | {lc} |")
    lines += ["", "The file is the header (metadata, mostly the tokenizer copied from the source GGUF) plus the tensors; "
              "the tensors exceed the plan's size by the F32 norms (the plan counts every unquantized tensor at 16 bits) "
              "and alignment padding. The quantized tensors hold exactly the plan's bits (tests/test_export_gguf.py). "
              "llama.cpp's perplexity differs from transformers' on the same weights because its CPU matmuls "
              "quantize the activations (to Q8) for quantized weights."]
    if r["llama_cpp_presets"]:
        lines += ["", "llama.cpp's own presets (llama_model_quantize, no importance matrix) from an F32 export of the "
                  "same base weights:", "",
                  "| preset | tensor types | file (B) | ppl (transformers) | ppl (llama.cpp) | k-quant tensors identical to mixq's |",
                  "|---|---|---|---|---|---|"]
        for row in r["llama_cpp_presets"]:
            kinds = ", ".join(f"{k} ×{v}" for k, v in sorted(row["tensor_types"].items()))
            kq = row["kquants_vs_mixq"]
            lines.append(f"| {row['preset']} | {kinds} | {row['file_bytes']:,} | {row['ppl_gguf_transformers']:.4f} | "
                         f"{row['ppl_gguf_llama_cpp']:.4f} | {kq['identical']} / {kq['k-quant tensors']} |")
        lines += ["", "mixq's plans here are hand-written RTN mixes, not searched: at 4-5 bits they trail llama.cpp's presets, "
                  "which spend Q6_K/Q8_0 on some ffn_down and attn_v tensors (and whose Q4_0/Q5_0 use the grid's most "
                  "negative level, which mixq's symmetric formats leave out). Every k-quant tensor llama.cpp writes "
                  "holds the bytes of mixq's RTN in that k-quant (q4-k, q5-k, q6-k) of the same weights (last column)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
