"""Search backends, one module each, registered by name: Optuna's samplers (``random``, ``tpe``,
``nsga2``, ``nsga3``, ``qmc``, ``gp``), ``evo`` and ``ax`` (see ``base`` for the interface)."""

from mixq.search.backends import ax, evo, optuna  # noqa: F401  (registration)
from mixq.search.backends.base import (Backend, BackendContext, Budget, Fallback, Proposer, backend_names,
                                       check_backend, make_proposer, register_backend)

__all__ = ["Backend", "BackendContext", "Budget", "Fallback", "Proposer", "backend_names", "check_backend",
           "make_proposer", "register_backend"]
