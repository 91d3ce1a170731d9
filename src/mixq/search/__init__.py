"""Mixed-precision search: a space of per-unit choices, fast trials, samplers, durable studies."""

from mixq.search.space import SearchSpace
from mixq.search.study import SearchConfig, run_search

__all__ = ["SearchConfig", "SearchSpace", "run_search"]
