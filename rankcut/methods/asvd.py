"""Activation-aware SVD (ASVD; Yuan et al. 2023, arXiv:2312.05821).

Input channel j is scaled by ``s_j = (mean |x_j|)^α`` before the SVD, so channels that carry large
activations are approximated more carefully: ``W ≈ trunc(W S) S⁻¹`` with ``S = diag(s)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rankcut.methods.base import Preconditioned, SpectralConfig, register


def asvd_scales(absmean: torch.Tensor, alpha: float = 0.5, floor: float = 1e-6) -> torch.Tensor:
    """``(mean |x|)^α`` per channel, with dead channels lifted to a small floor so ``S`` stays invertible."""
    if not torch.isfinite(absmean).all():
        raise ValueError("activation statistics have non-finite entries")
    base = absmean.to(torch.float64)
    base = base.clamp_min(max(floor, floor * base.max().item()))
    return base.pow(alpha)


@dataclass(frozen=True)
class ASVDConfig(SpectralConfig):
    """``asvd``: the solver settings and the activation exponent α."""

    alpha: float = field(default=0.5, metadata={"help": "ASVD activation exponent α (channel scale mean|x|^α)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
        if not (ok and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")


@register("asvd", stat="absmean", reference="Yuan et al. 2023, ASVD, arXiv:2312.05821", config=ASVDConfig)
def asvd(W: torch.Tensor, stat: torch.Tensor, alpha: float = 0.5) -> Preconditioned:
    """``A = W diag(s)``; the right factor is divided by ``s`` column-wise afterwards."""
    if stat is None:
        raise ValueError("asvd needs calibration statistics (mean |x| per input channel)")
    if stat.shape != (W.shape[1],):
        raise ValueError(f"asvd statistic has shape {tuple(stat.shape)}, expected ({W.shape[1]},)")
    s = asvd_scales(stat, alpha).to(device=W.device, dtype=W.dtype)
    return Preconditioned(A=W * s, unapply=lambda R: R / s)
