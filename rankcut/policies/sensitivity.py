"""``sensitivity``: allocation from measured truncation costs (:mod:`rankcut.sensitivity`) with a spectrum prior.

Measured single-target curves are noisy where they are short (a few scoring windows, a few ranks) and cost a
forward pass per point; the method's own spectrum gives the *shape* of each target's cost curve for free but not
its *scale* (how much the target's output error matters to the model's output distribution, which differs from
layer to layer by orders of magnitude). The default (``prior="spectrum"``) takes the shape from the spectrum and
the scale from the measurement: for target t,

    cost_t(r) = λ_t · ρ_t(r),    ρ_t(r) = Σ_{i>r} σ_i² / Σ σ_i²  (the relative truncation loss, as ``spectrum``),
    λ_t = geometric mean over the measured ranks r_j of KL_t(r_j) / ρ_t(r_j),

so one measured point per target (rank ≈ half its largest useful rank, ``rankcut sensitivity``'s default) fixes
the curve. ``prior="none"`` uses the measured curve alone, interpolated between the measured ranks (or a
``fisher`` measurement, which predicts every rank). Allocated exactly within the budget
(:mod:`rankcut.policies.budget`); see BENCHMARKS.md for how the variants compare on three models.

The measurement is handed to the policy in ``compress_(..., context={"sensitivity": result})``;
``policy_options["key"]`` records which measurement the plan came from and must match it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rankcut.policies.base import register_policy
from rankcut.policies.budget import BudgetOptions, BudgetPolicy
from rankcut.units import Candidate, Unit

PRIORS = ("spectrum", "none")


@dataclass(frozen=True)
class SensitivityOptions(BudgetOptions):
    """``key``: the cache key of the measurement the plan uses (checked against the one given); ``prior``:
    ``spectrum`` (measured scale × spectral shape, default) or ``none`` (the measured curve alone)."""

    key: str | None = None
    prior: str = "spectrum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")


def spectral_scale(scores, ranks, candidate: Candidate) -> float:
    """λ: the geometric mean of measured score / relative truncation loss over the measured ranks (0 when the
    measurement saw no cost)."""
    ratios = []
    for rank, score in zip(ranks, scores):
        rel = candidate.truncation_loss(rank) / candidate.total if candidate.total > 0 else 0.0
        if score > 0 and rel > 0:
            ratios.append(math.log(score / rel))
    return math.exp(sum(ratios) / len(ratios)) if ratios else 0.0


@register_policy
class Sensitivity(BudgetPolicy):
    name = "sensitivity"
    options_cls = SensitivityOptions

    def __init__(self, config, context=None) -> None:
        super().__init__(config, context)
        self.measured = self.context.get("sensitivity")
        if self.measured is None:
            raise ValueError("allocation sensitivity needs a sensitivity measurement: measure it with rankcut "
                             "sensitivity (rankcut.sensitivity.measure_sensitivity) and pass "
                             "context={'sensitivity': result} (--sensitivity DIR)")
        if self.options.key is not None and self.options.key != self.measured.key:
            raise ValueError(f"the plan asks for sensitivity measurement {self.options.key[:12]}…, but "
                             f"{self.measured.key[:12]}… was given")
        self.scales: dict[str, float] = {}
        if self.options.prior == "none":
            short = [n for n, c in self.measured.curves.items() if len(c["ranks"]) < 3]
            if short:
                raise ValueError(f"prior 'none' uses the measured curve alone, and {short[0]} has {len(self.measured.curves[short[0]]['ranks'])} "
                                 "measured rank(s): measure a grid (several fractions, or score fisher) or keep the "
                                 "spectrum prior")

    def cost(self, unit: Unit, candidate: Candidate, rank: int) -> float:
        missing = [n for n in unit.names if n not in self.measured.curves]
        if missing:
            raise ValueError(f"the sensitivity measurement has no curve for {missing[0]} (measured on other targets?)")
        if self.options.prior == "none":
            return sum(self.measured.cost(name, rank) for name in unit.names)
        if len(unit.names) > 1:
            raise ValueError("the spectrum prior applies to single targets; use prior='none' for groups")
        (name,) = unit.names
        if name not in self.scales:
            curve = self.measured.curves[name]
            self.scales[name] = spectral_scale(curve["scores"], curve["ranks"], candidate)
        rel = candidate.truncation_loss(rank) / candidate.total if candidate.total > 0 else 0.0
        return self.scales[name] * rel
