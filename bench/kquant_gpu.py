"""k-quants on CUDA: ggml's reference bytes, CUDA against CPU, and timings (one GPU).

    PYTHONPATH=src python bench/kquant_gpu.py --out bench/results/kquant_h200

Needs the ``gguf`` wheel only for the tests' reference input (tests/test_kquant.py). On CUDA the
searches run on the whole weight at once (on CPU 128 super-blocks at a time); the check is that
both give ggml's bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kquant import GGML_REF_SHA256, ggml_input  # noqa: E402

from mixq.formats import parse_format  # noqa: E402
from mixq.provenance import provenance  # noqa: E402
from mixq.solvers import get_solver  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    ap.add_argument("--size", type=int, default=4096, help="rows and columns of the timed random weight")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kquant_gpu.py needs CUDA")
    ref = torch.from_numpy(ggml_input()).reshape(6, 768)
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02
    rows = []
    for bits in (2, 3, 4, 5, 6):
        fmt = parse_format(f"q{bits}-k")
        reference = hashlib.sha256(fmt.to_ggml(fmt.quantize(ref.cuda())).tobytes()).hexdigest() == GGML_REF_SHA256[bits]
        fmt.quantize(w[:256].cuda())  # warm-up
        on_gpu, seconds = timed(lambda f=fmt: f.quantize(w.cuda()))
        t = time.perf_counter()
        on_cpu = fmt.quantize(w)
        cpu_seconds = time.perf_counter() - t
        rows.append({"format": fmt.name, "ggml_reference_bytes_on_cuda": reference,
                     "cuda_equals_cpu": bool(np.array_equal(fmt.to_ggml(on_gpu), fmt.to_ggml(on_cpu))),
                     "cuda_seconds": seconds, "cpu_seconds": cpu_seconds})
        print(json.dumps(rows[-1]), flush=True)
    a = torch.randn(args.size, 2 * args.size, device="cuda")
    gram = a @ a.T / (2 * args.size)
    solver, fmt = get_solver("gptq"), parse_format("q4-k")
    out, gptq_seconds = timed(lambda: solver(w.cuda(), fmt, gram, solver.options({})))
    record = {"provenance": provenance(model=None, seed=0, device="cuda"), "size": args.size, "formats": rows,
              "gptq_q4_k_seconds": gptq_seconds, "gptq_codes_are_weight": bool(torch.equal(out.weight, fmt.dequantize(out.qtensor)))}
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    p = record["provenance"]
    lines = [f"# k-quants on {p['device']} ({p['date'][:10]})", "", f"Command: `{p['command']}`", "",
             f"| format | ggml's reference bytes on CUDA | CUDA = CPU ({args.size}×{args.size}) | CUDA s | CPU s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['ggml_reference_bytes_on_cuda']} | {r['cuda_equals_cpu']} | {r['cuda_seconds']:.3f} | "
              f"{r['cpu_seconds']:.2f} |" for r in rows]
    lines += ["", f"GPTQ with q4-k on a {args.size}×{args.size} weight: {gptq_seconds:.1f} s (PyTorch column loop); "
              f"solved weight = dequantised codes: {record['gptq_codes_are_weight']}."]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
