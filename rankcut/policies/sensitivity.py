"""``sensitivity``: allocation from measured truncation costs (:mod:`rankcut.sensitivity`).

Each unit's cost at rank r is the measured cost of truncating that target alone at r (KL divergence from the
dense model's next-token distribution on scoring windows of the calibration text, by default), interpolated
between the measured ranks; allocated exactly within the budget (:mod:`rankcut.policies.budget`).

The measurement is handed to the policy in ``compress_(..., context={"sensitivity": result})``;
``policy_options["key"]`` records which measurement the plan came from and must match it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rankcut.policies.base import register_policy
from rankcut.policies.budget import BudgetOptions, BudgetPolicy
from rankcut.units import Candidate, Unit


@dataclass(frozen=True)
class SensitivityOptions(BudgetOptions):
    """``key``: the cache key of the measurement the plan uses (checked against the one given)."""

    key: str | None = None


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

    def cost(self, unit: Unit, candidate: Candidate, rank: int) -> float:
        missing = [n for n in unit.names if n not in self.measured.curves]
        if missing:
            raise ValueError(f"the sensitivity measurement has no curve for {missing[0]} (measured on other targets?)")
        return sum(self.measured.cost(name, rank) for name in unit.names)
