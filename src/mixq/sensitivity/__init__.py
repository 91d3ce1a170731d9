"""Per-layer sensitivity: Hessian trace (Hutchinson), Fisher trace (FIT), measured KL."""

from mixq.sensitivity.estimators import fisher_trace, hutchinson_trace, shifted_nll

__all__ = ["fisher_trace", "hutchinson_trace", "shifted_nll"]
