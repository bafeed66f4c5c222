"""Plain truncated SVD of the weight (Eckart–Young: the best rank-r approximation in Frobenius norm)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankcut.methods.base import Preconditioned, SpectralConfig, register


@dataclass(frozen=True)
class SVDConfig(SpectralConfig):
    """``svd`` has only the solver settings."""


@register("svd", stat=None, reference="Eckart & Young 1936; Denton et al. 2014", config=SVDConfig)
def svd(W: torch.Tensor, stat: None = None) -> Preconditioned:
    """Factorise ``W`` itself: minimises ‖W − W′‖_F, blind to the inputs the layer sees."""
    return Preconditioned(A=W, unapply=lambda R: R)
