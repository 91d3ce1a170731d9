"""Layer solvers: pure functions from a weight (and a Gram matrix) to quantized codes."""

from mixq.solvers import gptq, quantease, rtn  # noqa: F401  (registration)
from mixq.solvers.registry import SolveResult, Solver, get_solver, solver_names

__all__ = ["SolveResult", "Solver", "get_solver", "solver_names"]
