"""``rank``: the same rank for every unit (units where it reaches break-even stay dense)."""

from __future__ import annotations

from rankcut.policies.base import Policy, register_policy
from rankcut.policies.uniform import rank_bound
from rankcut.units import Candidate, Decision, Unit


@register_policy
class FixedRank(Policy):
    name = "rank"

    @classmethod
    def check_config(cls, config) -> None:
        if config.speedup is not None:
            raise ValueError("allocation rank takes no speedup budget (a global allocation does: spectrum or "
                             "sensitivity)")
        if config.rank is None:
            raise ValueError("allocation rank needs rank=N")

    def __init__(self, config=None, context=None, rank: int | None = None) -> None:
        self.rank = rank if rank is not None else config.rank
        self.config, self.context, self.options = config, context or {}, None

    def bound(self, unit: Unit) -> int | Decision:
        return rank_bound(unit, self.rank)

    def choose(self, unit: Unit, candidate: Candidate) -> Decision:
        return Decision(min(self.bound(unit), candidate.max_rank))
