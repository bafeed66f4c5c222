"""The decomposition shared by every spectral method: precondition, truncated SVD, factors at any rank. Pure."""

from __future__ import annotations

import torch
from torch import nn

from rankcut.linalg import split_factors, svd_top
from rankcut.modules.lowrank import LowRankLinear
from rankcut.units import Candidate, Unit


def _low_rank(U: torch.Tensor, V: torch.Tensor, dense: nn.Module) -> LowRankLinear:
    """A :class:`LowRankLinear` from factors, in the dense layer's dtype and device, with its bias."""
    from rankcut.modules.dense import dense_weight

    weight = dense_weight(dense)
    bias = getattr(dense, "bias", None)
    return LowRankLinear.from_factors(U.to(weight.device), V.to(weight.device), None if bias is None else bias.detach(),
                                      dtype=weight.dtype)


class SpectralCandidate(Candidate):
    """One target's truncated SVD ``A ≈ U S Vh`` in the method's space, with the map back (``pre.unapply``).

    :meth:`factors` at rank r truncates first, then maps back: ``(U_r √S_r, unapply(√S_r Vh_r))``.
    """

    def __init__(self, unit: Unit, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, pre, total: float) -> None:
        super().__init__(unit, int(S.numel()), S, total)
        self.U, self.S, self.Vh, self.pre = U, S, Vh, pre

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` of the rank-``rank`` factorisation, U (m×r) and V (r×n), in the SVD's dtype.

        Raises:
            ValueError: ``rank`` exceeds what was decomposed, or the factors are not finite.
        """
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank} (decomposed up to {self.max_rank})")
        U, S, Vh = self.U[:, :rank], self.S[:rank], self.Vh[:rank]
        Uf, Vf = split_factors(U, S, Vh)
        Vf = self.pre.unapply(Vf)
        if not (torch.isfinite(Uf).all() and torch.isfinite(Vf).all()):
            raise ValueError("factorisation produced non-finite factors")
        return Uf, Vf

    def build(self, rank: int, dense: dict[str, nn.Module]) -> dict[str, nn.Module]:
        name = self.unit.names[0]
        return {name: _low_rank(*self.factors(rank), dense[name])}

    def compact(self, dtype: torch.dtype | None = None) -> Candidate:
        """The factors at ``max_rank`` on the host (in ``dtype``, the layer's own); any rank is then a slice."""
        U, V = self.factors(self.max_rank)
        if dtype is not None:
            U, V = U.to(dtype), V.to(dtype)
        return FactorCandidate(self.unit, U, V, self.spectrum, self.total)


class FactorCandidate(Candidate):
    """Factors ``U`` (m×k) and ``V`` (k×n) ordered by singular value: rank r keeps the first r of each."""

    def __init__(self, unit: Unit, U: torch.Tensor, V: torch.Tensor, spectrum: torch.Tensor, total: float) -> None:
        super().__init__(unit, int(U.shape[1]), spectrum, total)
        self.U, self.V = U.cpu(), V.cpu()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank} (decomposed up to {self.max_rank})")
        return self.U[:, :rank], self.V[:rank]

    def build(self, rank: int, dense: dict[str, nn.Module]) -> dict[str, nn.Module]:
        name = self.unit.names[0]
        return {name: _low_rank(*self.factors(rank), dense[name])}


def decompose_spectral(precondition, items: list, config, rank: int, seed: int = 0) -> SpectralCandidate:
    """Truncated SVD of one item's preconditioned matrix, up to ``rank``.

    Raises:
        ValueError: more than one item, a weight that is not finite, or the method rejects its statistic.
    """
    if len(items) != 1:
        raise ValueError(f"a spectral method decomposes one target at a time, got {len(items)}")
    item = items[0]
    W = item.W
    if not torch.isfinite(W).all():
        raise ValueError("weight has non-finite values (inf/NaN)")
    pre = precondition(W.to(getattr(torch, config.svd_dtype)), item.stat, config)
    U, S, Vh = svd_top(pre.A, rank, solver=config.solver, oversample=config.oversample,
                       power_iters=config.power_iters, seed=seed)
    total = float(pre.A.to(torch.float64).pow(2).sum())
    return SpectralCandidate(Unit((item.target,)), U, S, Vh, pre, total)
