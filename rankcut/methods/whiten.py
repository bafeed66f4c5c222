"""Truncation-aware data whitening (SVD-LLM; Wang et al. 2024, arXiv:2403.07378).

With ``L Lᵀ = XᵀX`` (Cholesky of the calibration Gram matrix), ``‖(W − W′)X‖_F = ‖(W − W′)L‖_F``, so
truncating the SVD of ``W L`` minimises the layer's output error on the calibration set, and each
dropped singular value costs exactly its own size in that error.
"""

from __future__ import annotations

import torch

from rankcut.linalg import safe_cholesky
from rankcut.methods import Preconditioned, register


@register("whiten", stat="gram", reference="Wang et al. 2024, SVD-LLM, arXiv:2403.07378")
def whiten(W: torch.Tensor, stat: torch.Tensor, damping: float = 1e-6) -> Preconditioned:
    """``A = W L``; the right factor is mapped back by a triangular solve ``R L⁻¹`` (no explicit inverse)."""
    if stat is None:
        raise ValueError("whiten needs calibration statistics (the Gram matrix XᵀX)")
    n = W.shape[1]
    if stat.shape != (n, n):
        raise ValueError(f"whiten statistic has shape {tuple(stat.shape)}, expected ({n}, {n})")
    L, _ = safe_cholesky(stat.to(W.device), damping=damping)
    A = (W.to(torch.float64) @ L).to(W.dtype)

    def unapply(R: torch.Tensor) -> torch.Tensor:
        # R L⁻¹ = (L⁻ᵀ Rᵀ)ᵀ: solve Lᵀ Y = Rᵀ (upper triangular), then transpose.
        Y = torch.linalg.solve_triangular(L.mT, R.to(torch.float64).mT, upper=True)
        return Y.mT.to(R.dtype)

    return Preconditioned(A=A, unapply=unapply)
