"""Evaluation: perplexity and KL divergence to the base model."""

from mixq.evaluate.perplexity import (PerplexityResult, kl_divergence, kl_sum, log_probs, perplexity,
                                      perplexity_unbatched)

__all__ = ["PerplexityResult", "kl_divergence", "kl_sum", "log_probs", "perplexity", "perplexity_unbatched"]
