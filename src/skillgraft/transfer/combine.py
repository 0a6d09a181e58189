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
    z_large: torch.Tensor,
    z_experts: list[torch.Tensor],
    z_bases: list[torch.Tensor],
    grid: torch.Tensor,
    active: list[bool] | None = None,
) -> torch.Tensor:
    """Dynamic logit fusion: per row and expert t, the α in ``grid`` ⊂ [0, 2] whose single-expert fusion moves
    the large model as far (in KL) as the expert moved its own base:
    αₜ = argmin_α | KL(p̃ₜ(α) ‖ p_L) − KL(p_expert,t ‖ p_base,t) |, p̃ₜ(α) ∝ p_L · (p_expert,t / p_base,t)^α.
    Each expert is matched on its own (cost: len(grid) softmaxes per searched expert per step), then all are
    fused. Experts with ``active[t]`` false are not searched and get α = 0 (the gate's cap on the search cost).
    """
    lp_large = torch.log_softmax(z_large, -1)
    out = torch.zeros(z_large.shape[0], len(z_experts))
    for t, (ze, zb) in enumerate(zip(z_experts, z_bases)):
        if active is not None and not active[t]:
            continue
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
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores to sample from, and the α actually used ([batch, n_experts]).

    ``gate`` ([batch, n_experts], rows summing to 1) scales every expert's α per row (``prompt_gate``); under DLF
    experts whose gate is below ``GATE_MIN`` in every row are not searched.
    """
    if gate is not None:
        alphas = alphas * gate
    if method == "proxy":
        return proxy(z_large, z_experts, z_bases, alphas), alphas
    if method == "eft":
        return eft(z_large, z_experts, z_bases, alphas), alphas
    if method == "dlf":
        assert grid is not None
        active = None if gate is None else (gate.amax(0) >= GATE_MIN).tolist()
        a = dlf_alphas(z_large, z_experts, z_bases, grid, active)
        a = a * gate if gate is not None else a
        return eft(z_large, z_experts, z_bases, a), a
    raise ValueError(method)


GATE_MIN = 1e-3  # under DLF, experts gated below this for every row are not searched


def prompt_gate(
    prompt_ids: torch.Tensor, mask: torch.Tensor, z_experts: list[torch.Tensor], z_bases: list[torch.Tensor]
) -> torch.Tensor:
    """Per-row expert weights from the prompt: softmax over experts t of the prompt's log-likelihood gain
    Σᵢ [log p_expert,t(xᵢ₊₁ | x≤ᵢ) − log p_base,t(xᵢ₊₁ | x≤ᵢ)] — the posterior of "this prompt is expert t's
    task" under a uniform prior, with each expert's likelihood measured relative to its own base.

    ``prompt_ids`` and ``mask`` are ``[batch, length]`` (left padding masked out); the logits are
    ``[batch, length, vocab]`` over the prompt. Returns ``[batch, n_experts]``.
    """
    target = prompt_ids[:, 1:, None]
    valid = (mask[:, :-1] * mask[:, 1:]).float()  # predicting a real token from a real one
    gains = []
    for ze, zb in zip(z_experts, z_bases):
        lpe = torch.log_softmax(ze[:, :-1].float(), -1).gather(-1, target)[..., 0]
        lpb = torch.log_softmax(zb[:, :-1].float(), -1).gather(-1, target)[..., 0]
        gains.append(((lpe - lpb) * valid).sum(1))
    return torch.softmax(torch.stack(gains, 1), 1)
