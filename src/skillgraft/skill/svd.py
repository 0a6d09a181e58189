"""Truncated SVD in fp32: exact for small matrices, seeded randomized range finder for large ones.

Returns balanced factors ``up = U·√S`` and ``down = √S·Vᵀ`` so ``up @ down`` is the rank-k approximation.
"""

from __future__ import annotations

import torch

EXACT_LIMIT = 128  # at or below this smaller dimension a full SVD is cheap; above, only when k is large


def top_singular(
    a: torch.Tensor, k: int, seed: int = 0, niter: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets (U [m,k], S [k], Vh [k,n]) of a 2-D fp32 matrix."""
    a = a.float()
    m, n = a.shape
    k = min(k, m, n)
    if min(m, n) <= EXACT_LIMIT or 3 * k >= min(m, n):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    gen = torch.Generator().manual_seed(seed)
    p = min(k + max(8, k // 4), min(m, n))  # oversampling
    omega = torch.randn(n, p, generator=gen)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(niter):  # power iterations with re-orthonormalisation
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    b = q.T @ a  # [p, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:r].sqrt()
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous()
