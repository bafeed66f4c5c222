"""Numerical building blocks: SVD solvers, safe Cholesky, factor splitting. Pure tensor functions."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def break_even_rank(m: int, n: int) -> float:
    """``mn/(m+n)``: at or above this rank the two factors hold at least as many parameters as W."""
    return m * n / (m + n)


def truncated_svd(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD of ``A`` (m×n) truncated to its top ``k`` triplets: U (m×k), S (k), Vh (k×n)."""
    if A.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(A.shape)}")
    k = min(k, *A.shape)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def randomized_svd(
    A: torch.Tensor, k: int, oversample: int = 16, power_iters: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD by randomized range finding (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    A Gaussian sketch of ``k + oversample`` columns is multiplied by ``(A Aᵀ)^power_iters A``, with a QR
    re-orthonormalisation after every product for stability; the small projected matrix is then solved
    exactly. When the sketch would cover the whole of the smaller side, the exact SVD is used instead.
    """
    m, n = A.shape
    k = min(k, m, n)
    width = k + oversample
    if width >= min(m, n):
        return truncated_svd(A, k)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, device=A.device, dtype=A.dtype)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(A.mT @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k]


def svd_top(A: torch.Tensor, k: int, solver: str = "exact", oversample: int = 16, power_iters: int = 2, seed: int = 0):
    """Dispatch to the named solver: ``exact`` or ``randomized``."""
    if solver == "exact":
        return truncated_svd(A, k)
    if solver == "randomized":
        return randomized_svd(A, k, oversample=oversample, power_iters=power_iters, seed=seed)
    raise ValueError(f"unknown solver {solver!r}; choose exact or randomized")


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance the singular values between the factors: ``(U √S, √S Vh)``; keeps fp16 factors in range."""
    root = S.clamp_min(0).sqrt()
    return U * root, root[:, None] * Vh


def safe_cholesky(G: torch.Tensor, damping: float = 1e-6, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor ``L`` with ``L Lᵀ = G + λ·mean(diag G)·I``, in float64.

    ``λ`` is 0 when G is positive definite; otherwise it starts at ``damping`` and grows tenfold per failed
    try. A Gram matrix from too few calibration tokens, or with dead input channels, is only positive
    semi-definite, and this keeps the factor finite.

    Returns:
        ``(L, λ)``.

    Raises:
        ValueError: G is not square, not finite, or still not positive definite after ``max_tries``.
    """
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Gram matrix must be square, got {tuple(G.shape)}")
    G = G.to(torch.float64)
    if not torch.isfinite(G).all():
        raise ValueError("Gram matrix has non-finite entries (inf/NaN activations in calibration)")
    G = (G + G.mT) / 2
    scale = G.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny).item()
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    lam = 0.0
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(G + lam * scale * eye if lam else G)
        if info.item() == 0 and torch.isfinite(L).all():
            if lam:
                log.info("Gram matrix not positive definite; used damping %.1e", lam)
            return L, lam
        lam = damping if attempt == 0 else lam * 10
    raise ValueError(f"Gram matrix not positive definite even with damping {lam / 10:.1e}")
