"""Golub–Kahan–Lanczos bidiagonalisation: the top-k SVD of a matrix (or a batch of them) from matrix–vector
products only. Pure math.

``A V_p = U_p B_p`` and ``Aᵀ U_p = V_p B_pᵀ + β_p v_{p+1} e_pᵀ`` with ``B_p`` upper bidiagonal (α on the diagonal,
β above it); the SVD of the small ``B_p = P Σ Qᵀ`` gives Ritz triplets ``(U_p P, Σ, V_p Q)`` whose residual norms
are ``‖Aᵀ u_i − σ_i v_i‖ = β_p |P[p-1, i]|`` (Golub & Van Loan, §10.4). Steps are added in blocks until the top
``k`` residuals fall below ``tol · σ_1`` or the Krylov space is the whole space; the triplets returned are then
the Rayleigh–Ritz ones of the shorter side's Krylov basis (one p × m × n product more), which stay exact at
full rank where the recurrence's last vectors are rounding noise.

Reorthogonalisation (finite precision destroys the orthogonality of the Lanczos vectors as Ritz values
converge, which produces spurious copies of singular values):

- ``full``: every new vector is orthogonalised against all previous ones, twice (classical Gram–Schmidt with
  re-orthogonalisation): robust, O(p²·(m+n)) extra work;
- ``selective``: the new vector's largest overlap with the previous ones is measured and the same two-pass
  projection is applied only when it exceeds √ε (ε the dtype's machine epsilon), i.e. only at the steps where
  orthogonality was actually being lost;
- ``none``: plain Lanczos (for the study only; clustered spectra break it).
"""

from __future__ import annotations

import math

import torch

REORTH = ("full", "selective", "none")


def _orth(w: torch.Tensor, Q: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """``w`` (b × d) orthogonalised against the columns of ``Q`` (b × d × j) as ``mode`` says."""
    if mode == "none" or Q.shape[-1] == 0:
        return w
    if mode == "selective":
        overlap = (Q.mT @ w[..., None]).abs().amax(dim=(-2, -1)) / w.norm(dim=-1).clamp_min(1e-300)
        if not bool((overlap > math.sqrt(eps)).any()):
            return w
    for _ in range(2):
        w = w - (Q @ (Q.mT @ w[..., None]))[..., 0]
    return w


def _normalise(w: torch.Tensor, norm: torch.Tensor, Q: torch.Tensor, scale: torch.Tensor, eps: float,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``w / ‖w‖``; where ``‖w‖`` is at the rounding level (≤ √ε · the largest α/β so far: an invariant subspace
    was reached, e.g. a rank-deficient matrix, or the space is nearly exhausted) the vector is noise, so it is
    replaced by a random unit vector orthogonal to ``Q`` and its coefficient set to 0 (a restart)."""
    dead = norm <= math.sqrt(eps) * scale.clamp_min(1e-300)
    out = w / norm.clamp_min(1e-300)[:, None]
    if bool(dead.any()) and Q.shape[-1] < w.shape[-1]:
        r = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        r = _orth(r, Q, "full", eps)
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        out = torch.where(dead[:, None], r, out)
        norm = torch.where(dead, torch.zeros_like(norm), norm)
    return out, norm


def lanczos_svd(A: torch.Tensor, k: int, *, reorth: str = "full", tol: float | None = None, block: int = 16,
                max_steps: int | None = None, seed: int = 0, return_info: bool = False):
    """Top-``k`` singular triplets of ``A`` (m × n, or a batch b × m × n) by Golub–Kahan–Lanczos.

    Args:
        k: triplets wanted (1 ≤ k ≤ min(m, n)).
        reorth: ``full``, ``selective`` or ``none`` (module docstring).
        tol: stop when every one of the top ``k`` Ritz residuals is ≤ ``tol · σ_1`` for every matrix of the
            batch (default ``10·√ε`` of the working dtype: 3.5e-3 in float32, 1.5e-7 in float64).
        block: Lanczos steps added between convergence checks.
        max_steps: at most this many steps (default min(m, n)); at min(m, n) the result is exact.
        seed: the starting vector's seed.

    Returns:
        ``(U, S, Vh)`` as :func:`torch.linalg.svd` truncated to ``k`` (batched when ``A`` is), in ``A``'s dtype;
        with ``return_info``, also ``{"steps", "residuals", "converged"}``.

    Raises:
        ValueError: ``k`` outside 1..min(m, n), an unknown ``reorth``, a non-floating or non-2/3-D input.
    """
    if A.ndim not in (2, 3) or not A.is_floating_point():
        raise ValueError(f"lanczos_svd needs a floating-point matrix or batch of matrices, got shape {tuple(A.shape)}")
    if reorth not in REORTH:
        raise ValueError(f"reorth must be one of {', '.join(REORTH)}, got {reorth!r}")
    batched = A.ndim == 3
    X = A if batched else A[None]
    b, m, n = X.shape
    full = min(m, n)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= full:
        raise ValueError(f"rank {k} must be an integer in 1..{full} (the matrix is {m} × {n})")
    dtype = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
    X = X.to(dtype)
    eps = torch.finfo(dtype).eps
    tol = 10 * math.sqrt(eps) if tol is None else tol
    limit = min(full, max_steps or full)
    limit = max(limit, k)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # start in the row space (v = Aᵀ g): a random v would carry a null-space part when m < n, and the Krylov
    # space would then never hold the whole row space within min(m, n) steps
    g = torch.randn(b, m, generator=gen, dtype=torch.float64).to(device=X.device, dtype=dtype)
    v = (X.mT @ g[..., None])[..., 0]
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cap = min(limit, 2 * k + 2 * block)  # storage grows (doubling) only if the iteration needs more steps
    U = X.new_zeros(b, m, cap)
    V = X.new_zeros(b, n, cap + 1)
    alpha = X.new_zeros(b, cap)
    beta = X.new_zeros(b, cap)
    V[..., 0] = v
    u_prev = X.new_zeros(b, m)
    scale = X.new_zeros(b)
    steps = 0
    target = min(limit, max(k + block, 2 * k))
    while True:
        if target > cap:
            grow = min(limit, max(target, 2 * cap)) - cap
            U = torch.cat([U, X.new_zeros(b, m, grow)], -1)
            V = torch.cat([V, X.new_zeros(b, n, grow)], -1)
            alpha = torch.cat([alpha, X.new_zeros(b, grow)], -1)
            beta = torch.cat([beta, X.new_zeros(b, grow)], -1)
            cap += grow
        for j in range(steps, target):
            u = (X @ V[..., j, None])[..., 0] - (beta[:, j - 1, None] * u_prev if j else 0)
            u = _orth(u, U[..., :j], reorth, eps)
            a = u.norm(dim=-1)
            scale = torch.maximum(scale, a)
            u, a = _normalise(u, a, U[..., :j], scale, eps, gen)
            U[..., j], alpha[:, j] = u, a
            w = (X.mT @ u[..., None])[..., 0] - a[:, None] * V[..., j]
            w = _orth(w, V[..., :j + 1], reorth, eps)
            bt = w.norm(dim=-1)
            scale = torch.maximum(scale, bt)
            w, bt = _normalise(w, bt, V[..., :j + 1], scale, eps, gen)
            beta[:, j] = bt
            V[..., j + 1] = w
            u_prev = U[..., j]
        steps = target
        B = torch.diag_embed(alpha[:, :steps]) + torch.diag_embed(beta[:, : steps - 1], offset=1)
        P, S, Qh = torch.linalg.svd(B.to(torch.float64))
        residuals = beta[:, steps - 1, None].to(torch.float64).abs() * P[:, steps - 1, :k].abs()
        sigma1 = S[:, :1].clamp_min(1e-300)
        converged = bool((residuals <= tol * sigma1).all())
        if converged or steps >= limit:
            break
        target = min(limit, steps + block)
    # Rayleigh–Ritz on the Krylov basis of the shorter side: the SVD of U_pᵀ A (or A V_p) is the best
    # approximation within that subspace, and unlike the recurrence's other basis it stays accurate when the
    # Krylov space nears the whole space (the last Lanczos vectors are then mostly rounding noise)
    if m <= n:
        Pc, Sc, Qc = torch.linalg.svd(U[..., :steps].mT @ X, full_matrices=False)
        Uk, Sk, Vhk = U[..., :steps] @ Pc[..., :k], Sc[:, :k], Qc[:, :k]
    else:
        Pc, Sc, Qc = torch.linalg.svd(X @ V[..., :steps], full_matrices=False)
        Uk, Sk, Vhk = Pc[..., :k], Sc[:, :k], Qc[:, :k] @ V[..., :steps].mT
    out = (Uk, Sk, Vhk)
    out = tuple(t.to(A.dtype) for t in out)
    if not batched:
        out = tuple(t[0] for t in out)
    if return_info:
        info = {"steps": steps, "residuals": residuals.cpu(), "converged": converged}
        return (*out, info)
    return out
