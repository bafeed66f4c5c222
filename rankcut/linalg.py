"""Numerical building blocks: SVD solvers, safe Cholesky, factor splitting. Pure tensor functions."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: SVD solvers :func:`svd_top` dispatches to.
SOLVERS = ("exact", "randomized")


def break_even_rank(m: int, n: int) -> float:
    """``mn/(m+n)``: at or above this rank the two factors hold at least as many parameters as W."""
    return m * n / (m + n)


def truncated_svd(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD of ``A`` (m×n) truncated to its top ``k`` triplets: U (m×k), S (k), Vh (k×n)."""
    if A.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(A.shape)}")
    k = min(k, *A.shape)
    if A.is_cuda and A.dtype != torch.float64 and k >= 1:
        top = _gram_eigh_svd(A, k)
        if top is not None:
            return top
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def _gram_eigh_svd(A: torch.Tensor, k: int, min_ratio: float = 1e-4):
    """Top-``k`` SVD of a float32/16 CUDA matrix from the float64 eigendecomposition of its smaller Gram matrix.

    cuSOLVER's SVD (PyTorch's default there is Jacobi, ``gesvdj``) took ~1.1 s for a whitened 4096×4096 or
    11008×4096 float32 matrix on an H200, with relative errors up to 8e-4 in the top σ; this took 0.12 s
    with errors at float32 rounding (benchmarks/svd_gpu_solvers.py). Squaring the condition number costs
    a relative error of about ``n·ε₆₄·(σ_1/σ_i)²`` in σ_i², so the route is used only while
    ``σ_k ≥ min_ratio·σ_1``; otherwise, or on anything non-finite, it returns None and the caller falls
    back to ``torch.linalg.svd``.
    """
    A64 = A.to(torch.float64)
    tall = A.shape[0] >= A.shape[1]
    try:
        evals, evecs = torch.linalg.eigh(A64.mT @ A64 if tall else A64 @ A64.mT)
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence (e.g. non-finite input)
        return None
    S = evals.flip(0)[:k].clamp_min(0).sqrt()
    if not (torch.isfinite(evecs).all() and torch.isfinite(S).all() and S[-1] >= min_ratio * S[0] and S[0] > 0):
        return None
    E = evecs.flip(1)[:, :k]
    if tall:
        U, V = (A64 @ E) / S, E
    else:
        U, V = E, (A64.mT @ E) / S
    return U.to(A.dtype), S.to(A.dtype), V.mT.to(A.dtype)


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
        # A singular G can pass by rounding with a pivot ~1e-8·√scale; treat pivots at rounding level as failure.
        tiny = G.shape[0] * torch.finfo(torch.float64).eps * scale
        if info.item() == 0 and torch.isfinite(L).all() and L.diagonal().min().item() ** 2 > tiny:
            if lam:
                log.info("Gram matrix not positive definite; used damping %.1e", lam)
            return L, lam
        lam = damping if attempt == 0 else lam * 10
    raise ValueError(f"Gram matrix not positive definite even with damping {lam / 10:.1e}")
