"""CUDA-graph sweeps of QuantEase equal eager ones; timing of one layer of each solver."""

import time

import torch

from mixq.formats import parse_format
from mixq.solvers import get_solver
from mixq.solvers.grid import ColumnGrid
from mixq.solvers.quantease import coordinate_descent

torch.manual_seed(0)
dev = "cuda"
w = torch.randn(1536, 576, device=dev)
x = torch.randn(8192, 576, device=dev)
h = x.T @ x / len(x)
for name in ("int4-g128", "nf4-g64"):
    fmt = parse_format(name)
    grid = ColumnGrid.of(fmt, 576)
    grid.fit_all(w)
    start = grid.round_all(w)
    a = coordinate_descent(w, h, grid, start, iterations=4, relax=True, block_size=128, graphs=True)
    b = coordinate_descent(w, h, grid, start, iterations=4, relax=True, block_size=128, graphs=False)
    print(name, "graph == eager:", torch.allclose(a, b, atol=1e-5), float((a - b).abs().max()))
for solver in ("rtn", "gptq", "quantease"):
    s = get_solver(solver)
    s(w, parse_format("int4-g128"), h, s.options({}))
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = s(w, parse_format("int4-g128"), h, s.options({}))
    torch.cuda.synchronize()
    print(solver, f"{time.perf_counter() - t:.3f} s", r.loss)
