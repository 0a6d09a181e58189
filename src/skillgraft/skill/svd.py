"""Truncated SVD in fp32: exact for small matrices, seeded randomized range finder for large ones.

Returns balanced factors ``up = U·√S`` and ``down = √S·Vᵀ`` so ``up @ down`` is the rank-k approximation.
"""

from __future__ import annotations

import torch

EXACT_LIMIT = 128  # at or below this smaller dimension a full SVD is cheap; above, only when k is large


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of y's columns by CholeskyQR2 (two Gram-Cholesky passes, Gram in fp64): a few
    GEMMs instead of a Householder QR, which is ~10× slower on tall matrices here. Falls back to QR when the
    Gram matrix is not positive definite (rank-deficient input)."""
    q = y
    for _ in range(2):
        g = (q.T @ q).double()
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) != 0:
            return torch.linalg.qr(y)[0]
        q = torch.linalg.solve_triangular(chol, q.double().T, upper=False).T.to(y.dtype)
    return q


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
    q = orthonormalize(a @ omega)
    for _ in range(niter):  # power iterations with re-orthonormalisation
        q = orthonormalize(a @ orthonormalize(a.T @ q))
    b = q.T @ a  # [p, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:r].sqrt()
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous()
