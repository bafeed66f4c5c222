"""``uniform``: every unit keeps the fraction ``keep`` of its parameters (``r = floor(keep·mn/(m+n))``)."""

from __future__ import annotations

from rankcut.policies.base import Policy, register_policy
from rankcut.units import Candidate, Decision, Unit


def keep_bound(unit: Unit, keep: float) -> int | Decision:
    """The uniform-keep rank of ``unit``, or dense when it does not pay."""
    if keep >= 1:  # floor(r*) < r* when r* is not an integer: still lossy, so refuse
        return Decision(None, f"keep {keep} reaches break-even {unit.break_even:.1f}: kept dense")
    return rank_bound(unit, unit.uniform_rank(keep))


def rank_bound(unit: Unit, rank: int) -> int | Decision:
    """``rank`` for ``unit``, or dense when it reaches break-even."""
    if rank > unit.limit:
        return Decision(None, f"rank {rank} >= break-even {unit.break_even:.1f}: kept dense")
    if unit.limit < 1:
        return Decision(None, f"break-even rank {unit.break_even:.2f} < 1: kept dense")
    return rank


@register_policy
class Uniform(Policy):
    """Each unit keeps ``keep`` of its parameters; known before any decomposition."""

    name = "uniform"

    @classmethod
    def check_config(cls, config) -> None:
        if config.energy is not None or config.rank is not None or config.speedup is not None:
            raise ValueError("allocation uniform takes keep, not energy, rank or speedup (a speedup budget needs a "
                             "global allocation: spectrum or sensitivity)")
        if config.keep is None:
            config.keep = 0.8

    def __init__(self, config=None, context=None, keep: float | None = None) -> None:
        self.keep = keep if keep is not None else config.keep
        self.config, self.context, self.options = config, context or {}, None

    def bound(self, unit: Unit) -> int | Decision:
        return keep_bound(unit, self.keep)

    def choose(self, unit: Unit, candidate: Candidate) -> Decision:
        return Decision(min(self.bound(unit), candidate.max_rank))
