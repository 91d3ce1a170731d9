"""The fused Triton column sweeps against the PyTorch loops, on layers of SmolLM2-135M's shapes.

    python bench/fused_sweeps.py --out bench/results/fused_sweeps_h100.json

For each shape (rows × columns of q/k/v/o, gate/up and down_proj) and solver (GPTQ; QuantEase,
30 sweeps), one process times the solver with the kernels (``MIXQ_FUSED_SWEEPS=1``) and
without (the eager loop; QuantEase's replays CUDA graphs), and prints the ratio and how far
the two results agree (share of equal codes, relative gap of the layer objective).  The Gram
is of random correlated inputs; timings are medians of ``--repeat`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mixq.formats import parse_format
from mixq.provenance import provenance
from mixq.solvers import get_solver

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536)}


def layer(rows: int, cols: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(8 * cols, cols, generator=g) * (0.2 + torch.rand(cols, generator=g)) @ mix
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w.to(device), (x.T @ x / len(x)).to(device)


def timed(fn, repeat: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    out = fn()  # warm-up: compilation, graph capture
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int4,int4-g128,int3-g128")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    rows_out = []
    for spec in args.formats.split(","):
        fmt = parse_format(spec)
        for shape_name, (r, c) in SHAPES.items():
            w, gram = layer(r, c, "cuda")
            for name, opts in (("gptq", {}), ("quantease", {"iterations": 30})):
                solver = get_solver(name)
                options = solver.options(opts)
                res = {}
                for fused in ("1", "0"):
                    os.environ["MIXQ_FUSED_SWEEPS"] = fused
                    res[fused] = timed(lambda: solver(w, fmt, gram, options), args.repeat)
                (tf, rf), (te, re_) = res["1"], res["0"]
                row = {"format": spec, "shape": shape_name, "rows": r, "cols": c, "solver": name,
                       "fused_s": tf, "eager_s": te, "speedup": te / tf,
                       "codes_equal": float((rf.qtensor.codes == re_.qtensor.codes).float().mean()),
                       "identical": bool(torch.equal(rf.weight, re_.weight)),
                       "loss_fused": rf.loss, "loss_eager": re_.loss, "loss_rel_gap": rf.loss / re_.loss - 1}
                rows_out.append(row)
                print(f"{spec:>10} {shape_name:>13} {name:>9}: fused {tf * 1e3:8.1f} ms  eager {te * 1e3:8.1f} ms  "
                      f"x{te / tf:6.1f}  codes equal {row['codes_equal']:.4f}  identical {row['identical']}  "
                      f"loss gap {row['loss_rel_gap']:+.2e}",
                      flush=True)
    os.environ.pop("MIXQ_FUSED_SWEEPS")
    if args.out:
        meta = provenance(model=None, seed=0, device="cuda")
        with open(args.out, "w") as fh:
            json.dump({"provenance": meta, "rows": rows_out}, fh, indent=2)


if __name__ == "__main__":
    main()
