"""``plan``: the ranks of a plan made earlier (by ``rankcut search``, or by hand), applied as they are.

``policy_options``: ``ranks`` maps every target to its rank (an integer, or None for dense); ``model`` is the
SHA-256 of the weights the plan was made for (``rankcut.sensitivity.model_digest``), checked by the caller that
loads the plan. A target missing from the plan, or a planned target the model does not have, is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rankcut.policies.base import Policy, register_policy
from rankcut.policies.uniform import rank_bound
from rankcut.units import Candidate, Decision, Unit


@dataclass(frozen=True)
class PlanOptions:
    ranks: dict = field(default_factory=dict)
    model: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ranks, dict) or not self.ranks:
            raise ValueError("a plan needs ranks: {target name: rank or None}")
        for name, rank in self.ranks.items():
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
                raise ValueError(f"plan: rank of {name} must be an integer >= 1 or null (dense), got {rank!r}")


@register_policy
class FixedPlan(Policy):
    name = "plan"
    options_cls = PlanOptions

    @classmethod
    def check_config(cls, config) -> None:
        given = [k for k in ("keep", "energy", "rank", "speedup") if getattr(config, k) is not None]
        if given:
            raise ValueError(f"allocation plan takes its ranks from the plan, not {given[0]}")

    def check_targets(self, names: list[str]) -> None:
        extra = sorted(set(self.options.ranks) - set(names))
        if extra:
            raise ValueError(f"the plan names target(s) this model does not have: {extra[:3]} (a plan for another "
                             "model?)")

    def _rank(self, unit: Unit) -> int | None:
        ranks = self.options.ranks
        missing = [n for n in unit.names if n not in ranks]
        if missing:
            raise ValueError(f"the plan has no rank for target {missing[0]} (a plan for another model?)")
        chosen = {ranks[n] for n in unit.names}
        if len(chosen) > 1:
            raise ValueError(f"the plan gives the targets of one group ({unit.name}) different ranks")
        return chosen.pop()

    def bound(self, unit: Unit) -> int | Decision:
        rank = self._rank(unit)
        if rank is None:
            return Decision(None, "dense in the plan", chosen=True)
        return rank_bound(unit, rank)

    def choose(self, unit: Unit, candidate: Candidate) -> Decision:
        return Decision(min(self.bound(unit), candidate.max_rank))
