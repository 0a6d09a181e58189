"""Cross-scale skill transfer by logit arithmetic: a small (expert, expert-base) pair steers a large base.

Proxy tuning (raw logits), EFT up-scaling (log-probabilities, renormalised) and dynamic logit fusion (α chosen per
step by KL matching), with batched generation where every model keeps its own KV cache.
"""

from skillgraft.transfer.combine import METHODS
from skillgraft.transfer.fused import ExpertPair, FusedModel, GenerationSpec

__all__ = ["METHODS", "ExpertPair", "FusedModel", "GenerationSpec"]
