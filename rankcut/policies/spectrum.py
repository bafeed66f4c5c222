"""``spectrum``: allocation from the method's own spectrum, with no extra forward pass.

Each unit's cost at rank r is its truncation loss in the method's space relative to its whole spectrum,
``Σ_{i>r} σ_i² / Σ σ_i²`` (for ``whiten``, the fraction of the layer's output energy on the calibration set that
the truncation loses). Normalising per unit makes layers whose activations differ in scale comparable; the
unnormalised loss (``normalise="absolute"``) lets a few loud layers take the whole budget. Allocated exactly
within the budget (:mod:`rankcut.policies.budget`). For models where measuring sensitivity is too expensive.
"""

from __future__ import annotations

from dataclasses import dataclass

from rankcut.policies.base import register_policy
from rankcut.policies.budget import BudgetOptions, BudgetPolicy
from rankcut.units import Candidate, Unit


@dataclass(frozen=True)
class SpectrumOptions(BudgetOptions):
    """``normalise``: ``relative`` (loss / the unit's spectral energy, default) or ``absolute``."""

    normalise: str = "relative"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalise not in ("relative", "absolute"):
            raise ValueError(f"normalise must be relative or absolute, got {self.normalise!r}")


@register_policy
class Spectrum(BudgetPolicy):
    name = "spectrum"
    options_cls = SpectrumOptions

    def cost(self, unit: Unit, candidate: Candidate, rank: int) -> float:
        loss = candidate.truncation_loss(rank)
        if self.options.normalise == "absolute":
            return loss
        return loss / candidate.total if candidate.total > 0 else 0.0
