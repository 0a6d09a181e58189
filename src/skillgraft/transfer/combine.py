"""Pure per-step combination rules of the large base's and the small pairs' next-token scores.

All functions take ``[batch, vocab]`` fp32 tensors (already sliced to the shared vocabulary) and return scores
to sample from. ``alphas`` is ``[batch, n_experts]`` (a static α broadcast, or chosen per step by DLF).
"""

from __future__ import annotations

import torch

METHODS = ("proxy", "eft", "dlf")


def proxy(
    z_large: torch.Tensor, z_experts: list[torch.Tensor], z_bases: list[torch.Tensor], alphas: torch.Tensor
) -> torch.Tensor:
    """Proxy tuning on raw logits: z = z_L + Σₜ αₜ (z_expert,t − z_base,t)."""
    z = z_large.clone()
    for t, (ze, zb) in enumerate(zip(z_experts, z_bases)):
        z += alphas[:, t : t + 1] * (ze - zb)
    return z


def eft(
    z_large: torch.Tensor, z_experts: list[torch.Tensor], z_bases: list[torch.Tensor], alphas: torch.Tensor
) -> torch.Tensor:
    """EFT up-scaling in log-probability space, renormalised per token:
    log p = log_softmax(log p_L + Σₜ αₜ (log p_expert,t − log p_base,t))."""
    lp = torch.log_softmax(z_large, -1)
    for t, (ze, zb) in enumerate(zip(z_experts, z_bases)):
        lp = lp + alphas[:, t : t + 1] * (torch.log_softmax(ze, -1) - torch.log_softmax(zb, -1))
    return torch.log_softmax(lp, -1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def dlf_alphas(
    z_large: torch.Tensor, z_experts: list[torch.Tensor], z_bases: list[torch.Tensor], grid: torch.Tensor
) -> torch.Tensor:
    """Dynamic logit fusion: per row and expert t, the α in ``grid`` ⊂ [0, 2] whose single-expert fusion moves
    the large model as far (in KL) as the expert moved its own base:
    αₜ = argmin_α | KL(p̃ₜ(α) ‖ p_L) − KL(p_expert,t ‖ p_base,t) |, p̃ₜ(α) ∝ p_L · (p_expert,t / p_base,t)^α.
    Each expert is matched on its own (cost: len(grid) × n_experts softmaxes per step), then all are fused.
    """
    lp_large = torch.log_softmax(z_large, -1)
    out = torch.empty(z_large.shape[0], len(z_experts))
    for t, (ze, zb) in enumerate(zip(z_experts, z_bases)):
        lpe, lpb = torch.log_softmax(ze, -1), torch.log_softmax(zb, -1)
        target = kl(lpe, lpb)  # [B]
        shift = lpe - lpb
        fused = torch.log_softmax(lp_large[None] + grid[:, None, None] * shift[None], -1)  # [G, B, V]
        dist = (kl(fused, lp_large[None].expand_as(fused)) - target[None]).abs()  # [G, B]
        out[:, t] = grid[dist.argmin(0)]
    return out


def combine(
    method: str,
    z_large: torch.Tensor,
    z_experts: list[torch.Tensor],
    z_bases: list[torch.Tensor],
    alphas: torch.Tensor,
    grid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores to sample from, and the α actually used ([batch, n_experts])."""
    if method == "proxy":
        return proxy(z_large, z_experts, z_bases, alphas), alphas
    if method == "eft":
        return eft(z_large, z_experts, z_bases, alphas), alphas
    if method == "dlf":
        assert grid is not None
        a = dlf_alphas(z_large, z_experts, z_bases, grid)
        return eft(z_large, z_experts, z_bases, a), a
    raise ValueError(method)
