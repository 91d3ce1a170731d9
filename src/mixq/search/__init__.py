"""Mixed-precision search: a space of per-unit choices, fast trials, samplers, durable studies.

``space`` (what is searched), ``config`` (budget and objective), ``size`` (exact sizes, repair
and moves), ``cache`` (weights swapped in per trial), ``backends`` (proposers by name),
``store`` (the run directory), ``loop`` (``run_search``), ``starts``, ``objective``, ``report``.
"""

from mixq.search.config import SearchConfig, Start
from mixq.search.loop import run_search
from mixq.search.space import SearchSpace

__all__ = ["SearchConfig", "SearchSpace", "Start", "run_search"]
