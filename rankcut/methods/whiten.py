"""Truncation-aware data whitening (SVD-LLM; Wang et al. 2024, arXiv:2403.07378).

With ``L Lᵀ = XᵀX`` (Cholesky of the calibration Gram matrix), ``‖(W − W′)X‖_F = ‖(W − W′)L‖_F``, so
truncating the SVD of ``W L`` minimises the layer's output error on the calibration set, and each
dropped singular value costs exactly its own size in that error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rankcut.linalg import safe_cholesky
from rankcut.methods.base import Preconditioned, SpectralConfig, register


@dataclass(frozen=True)
class WhitenConfig(SpectralConfig):
    """``whiten``: the solver settings and the Cholesky damping tried first on a singular Gram matrix."""

    damping: float = field(default=1e-6, metadata={
        "help": "relative diagonal damping tried first when the Gram matrix is not positive definite (x10 per retry)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool)
        if not (ok and math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping must be > 0, got {self.damping!r}")


@register("whiten", stat="gram", reference="Wang et al. 2024, SVD-LLM, arXiv:2403.07378", config=WhitenConfig)
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
