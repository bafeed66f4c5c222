"""``energy``: per unit, the smallest rank whose singular values hold a fraction of the squared spectrum of the
matrix the method truncates (W for svd, W·diag(s) for asvd, W·L for whiten); dense when that reaches
break-even."""

from __future__ import annotations

import torch

from rankcut.policies.base import Policy, register_policy
from rankcut.units import Candidate, Decision, Unit


def energy_rank(S: torch.Tensor, total: float, threshold: float) -> int | None:
    """Smallest r with ``Σ_{i≤r} σ_i² ≥ threshold · total``, or None if the given singular values never
    reach it (``S`` may be only the top of the spectrum; ``total`` is the full ‖A‖_F²)."""
    if total <= 0:
        return 1
    cumulative = torch.cumsum(S.to(torch.float64) ** 2, 0) / total
    # A relative tolerance so that threshold 1.0 is reachable despite rounding in ‖A‖_F² vs Σσ².
    hits = torch.nonzero(cumulative >= threshold * (1 - 1e-12)).flatten()
    return int(hits[0]) + 1 if hits.numel() else None


@register_policy
class Energy(Policy):
    name = "energy"

    @classmethod
    def check_config(cls, config) -> None:
        if config.speedup is not None:
            raise ValueError("allocation energy takes no speedup budget (a global allocation does: spectrum or "
                             "sensitivity)")
        if config.energy is None:
            raise ValueError("allocation energy needs energy=E")

    def __init__(self, config=None, context=None, energy: float | None = None) -> None:
        self.energy = energy if energy is not None else config.energy
        self.config, self.context, self.options = config, context or {}, None

    def choose(self, unit: Unit, candidate: Candidate) -> Decision:
        rank = energy_rank(candidate.spectrum, candidate.total, self.energy)
        if rank is None:
            return Decision(None, f"energy {self.energy} needs rank >= break-even {unit.break_even:.1f}: kept dense")
        return Decision(rank)
