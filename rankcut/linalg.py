"""Numerical building blocks: SVD solvers, safe Cholesky, factor splitting. Pure tensor functions."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

#: SVD solvers :func:`svd_top` dispatches to.
SOLVERS = ("exact", "randomized", "lanczos")


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
    """Dispatch to the named solver: ``exact``, ``randomized`` or ``lanczos`` (Golub–Kahan–Lanczos with full
    reorthogonalisation, :func:`rankcut.lanczos.lanczos_svd`)."""
    if solver == "exact":
        return truncated_svd(A, k)
    if solver == "randomized":
        return randomized_svd(A, k, oversample=oversample, power_iters=power_iters, seed=seed)
    if solver == "lanczos":
        from rankcut.lanczos import lanczos_svd

        return lanczos_svd(A, min(k, *A.shape), seed=seed)
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


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


def _top_eigvecs(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` leading eigenvectors (columns) and eigenvalues of a symmetric matrix, descending."""
    values, vectors = torch.linalg.eigh((M + M.mT) / 2)
    return vectors.flip(1)[:, :k], values.flip(0)[:k].clamp_min(0)


def _leading_left(mats: list[torch.Tensor], k: int) -> torch.Tensor:
    """The ``k`` leading left singular vectors of the horizontal stack ``[A_1 … A_G]`` (the top eigenvectors of
    ``Σ A_g A_gᵀ``): by an SVD of the stack when it has fewer columns than rows, else by ``eigh`` of the m × m sum
    — the same subspace, at the cost of the smaller problem."""
    m = mats[0].shape[0]
    width = sum(a.shape[1] for a in mats)
    if width < m:
        U, _, _ = torch.linalg.svd(torch.cat(mats, 1), full_matrices=False)
        return U[:, :k]
    return _top_eigvecs(sum(a @ a.mT for a in mats), k)[0]


def hooi(slices: list[torch.Tensor], r_out: int, r_in: int | None = None, tol: float = 1e-10, max_iter: int = 50):
    """Tucker decomposition of the stacked tensor T (G × m × n) of ``slices`` by Higher-Order Orthogonal
    Iteration (De Lathauwer et al. 2000; seed 004's Algorithm 1), the slice mode kept at full rank.

    ``T ≈ Γ ×₂ U_out ×₃ U_in``: ``W_g ≈ U_out Γ_g U_inᵀ`` with orthonormal ``U_out`` (m × r_out) and ``U_in``
    (n × r_in) shared by every slice. Initialised by the truncated HOSVD (leading eigenvectors of each mode's
    Gram matrix), then each factor in turn is the leading subspace of its mode unfolding projected on the other
    factor, until the captured energy Σ‖Γ_g‖² changes by less than ``tol`` (relative) or ``max_iter`` passes.
    ``r_in`` None keeps the input mode whole (then one pass is exact). All in float64.

    Returns:
        ``(U_out, cores, U_in, info)``: ``cores`` a list of (r_out × r_in) matrices (``U_in`` is None and the
        cores are ``U_outᵀ W_g`` when ``r_in`` is None); ``info`` has ``iterations``, ``energy`` (captured) and
        ``total`` (‖T‖²), so the squared error is ``total − energy``.

    Raises:
        ValueError: slices of different shapes, or a rank outside 1..its mode's size.
    """
    if not slices:
        raise ValueError("hooi needs at least one slice")
    shapes = {tuple(s.shape) for s in slices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"the slices of a stacked tensor must be matrices of one shape, got {sorted(shapes)}")
    m, n = next(iter(shapes))
    if not 1 <= r_out <= m or (r_in is not None and not 1 <= r_in <= n):
        raise ValueError(f"core ranks ({r_out}, {r_in}) must lie within the factors' dimensions ({m}, {n})")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    W = [s.to(torch.float64) for s in slices]
    total = float(sum((w * w).sum() for w in W))
    if r_in is None:
        U_out = _leading_left(W, r_out)
        cores = [U_out.mT @ w for w in W]
        return U_out, cores, None, {"iterations": 1, "energy": float(sum((c * c).sum() for c in cores)), "total": total}
    U_out = _leading_left(W, r_out)
    U_in = _leading_left([w.mT for w in W], r_in)
    energy = -1.0
    for it in range(1, max_iter + 1):
        U_out = _leading_left([w @ U_in for w in W], r_out)  # of Σ (W U_in)(W U_in)ᵀ
        U_in = _leading_left([w.mT @ U_out for w in W], r_in)
        cores = [U_out.mT @ w @ U_in for w in W]
        new = float(sum((c * c).sum() for c in cores))
        if energy >= 0 and abs(new - energy) <= tol * max(total, 1e-300):
            energy = new
            break
        energy = new
    return U_out, cores, U_in, {"iterations": it, "energy": energy, "total": total}


def tucker_break_even(H: int, W: int) -> float:
    """Seed 004's break-even pruned rank of a core-plus-factors layer (H × W weight, square core of rank PR:
    ``PR² + PR(H + W)`` parameters): ``PR < (√((H+W)² + 4HW) − (H+W)) / 2``, the positive root of
    ``PR² + (H+W)·PR − HW``. Below it the Tucker layer holds fewer parameters than the dense one."""
    s = H + W
    return (math.sqrt(s * s + 4 * H * W) - s) / 2


def shared_output_basis(slices: list[torch.Tensor], grams: list[torch.Tensor | None], rank: int
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The output basis ``U`` (m × rank, orthonormal) shared by every slice that minimises
    ``Σ_g ‖(W_g − U Uᵀ W_g) L_g‖²`` with ``L_g L_gᵀ = G_g`` each slice's own input Gram (None: the identity).

    The objective is ``Σ_g tr(W_g G_g W_gᵀ) − tr(Uᵀ M U)`` with ``M = Σ_g W_g G_g W_gᵀ``, so ``U`` is M's top
    eigenvectors, exactly (no iteration, no Cholesky), and each slice's coefficients ``Uᵀ W_g`` are optimal
    for that ``U`` in its own whitened norm (Basis Sharing, arXiv:2410.03765, with SVD-LLM's whitening).

    Returns:
        ``(U, eigenvalues, total)``: ``eigenvalues`` descending (the captured energy per direction, float64)
        and ``total = tr(M)``; the squared whitened error at rank r is ``total − Σ_{i<r} eigenvalues[i]``.
    """
    W = [s.to(torch.float64) for s in slices]
    M = sum((w @ g.to(w) @ w.mT) if g is not None else w @ w.mT for w, g in zip(W, grams))
    total = float(torch.diagonal(M).sum())
    U, values = _top_eigvecs(M, rank)
    return U, values, total
