"""The base of the budgeted global policies: a cost per (unit, rank), a budget, and the exact allocator.

A budgeted policy offers each unit the ranks of a grid (multiples of ``rank_multiple``, below break-even: the
kernels and cuBLAS take their fast paths at multiples of 8, :mod:`rankcut.kernels.plan`) and dense, each with
what it spends and what it costs; :func:`rankcut.policies.allocate.allocate` picks the cheapest plan within
the budget. The budget is either

- kept parameters: ``keep`` × the targets' parameters (``CompressConfig.keep``), or
- a predicted batch-1 decode speedup of the whole model (``CompressConfig.speedup``): the roofline cost model
  (:mod:`rankcut.cost`, an H200 in bf16) gives each unit's seconds per token at each rank, the LM head and the
  small kernels of the step are a fixed cost (``context["fixed_decode_seconds"]``, which ``compress_`` fills
  from :func:`rankcut.cost.fixed_decode_seconds`), and the targets may spend ``T_dense / speedup − fixed``.

Subclasses define :meth:`BudgetPolicy.cost`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rankcut import cost as cost_model
from rankcut.policies.allocate import Curve, allocate
from rankcut.policies.base import Policy
from rankcut.units import Candidate, Decision, Unit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetOptions:
    """Settings every budgeted policy has.

    Attributes:
        rank_multiple: ranks offered are multiples of this (all ranks below it for layers too small for one).
    """

    rank_multiple: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple must be an integer >= 1, got {self.rank_multiple!r}")


def rank_grid(limit: int, multiple: int) -> list[int]:
    """Multiples of ``multiple`` up to ``limit``; every rank up to ``limit`` when ``limit`` < ``multiple``."""
    if limit < 1:
        return []
    if limit < multiple:
        return list(range(1, limit + 1))
    return list(range(multiple, limit + 1, multiple))


class BudgetPolicy(Policy):
    """A global policy: per-rank costs, allocated exactly within a parameter or predicted-time budget."""

    is_global = True
    options_cls = BudgetOptions

    @classmethod
    def check_config(cls, config) -> None:
        if config.energy is not None or config.rank is not None:
            raise ValueError(f"allocation {cls.name} takes a budget: keep or speedup, not energy or rank")
        if config.keep is None and config.speedup is None:
            config.keep = 0.8

    def cost(self, unit: Unit, candidate: Candidate, rank: int) -> float:
        """The quality cost of ``unit`` at ``rank`` (dense costs 0)."""
        raise NotImplementedError

    def resource(self, unit: Unit, rank: int | None) -> float:
        """What ``unit`` spends of the budget at ``rank`` (None: dense)."""
        if self.config.speedup is None:
            return float(unit.dense_params if rank is None else unit.params(rank))
        if rank is None:
            return sum(cost_model.dense_time(*t.shape) for t in unit.targets)
        return sum(cost_model.lowrank_time(*t.shape, rank) for t in unit.targets)

    def budget(self, units: list[Unit], fixed: dict[Unit, Decision]) -> float:
        """What the planned units may spend in all, after the fixed ones."""
        spent = sum(self.resource(u, d.rank) for u, d in fixed.items())
        if self.config.speedup is None:
            total = sum(u.dense_params for u in [*units, *fixed])
            return self.config.keep * total - spent
        fixed_s = self.context.get("fixed_decode_seconds", 0.0)
        dense_s = sum(self.resource(u, None) for u in [*units, *fixed]) + fixed_s
        return dense_s / self.config.speedup - fixed_s - spent

    def curve(self, unit: Unit, candidate: Candidate) -> Curve:
        grid = [r for r in rank_grid(min(unit.limit, candidate.max_rank), self.options.rank_multiple)]
        points = [(self.resource(unit, r), float(self.cost(unit, candidate, r)), r) for r in grid]
        points.append((self.resource(unit, None), 0.0, None))
        return Curve(unit, points)

    def plan(self, candidates: dict[Unit, Candidate], fixed: dict[Unit, Decision]) -> dict[Unit, Decision]:
        units = list(candidates)
        curves = [self.curve(u, c) for u, c in candidates.items()]
        budget = self.budget(units, fixed)
        what = "parameters" if self.config.speedup is None else "predicted seconds per token"
        try:
            result = allocate(curves, budget)
        except ValueError as err:
            goal = f"keep {self.config.keep}" if self.config.speedup is None else f"speedup {self.config.speedup}"
            raise ValueError(f"allocation {self.name}: {goal} {err.args[0].removeprefix('the ')} ({what})") from None
        self.result = result
        log.info("allocation %s: %s solver, %s %.6g of %.6g, cost %.6g", self.name, result.solver, what,
                 result.resource, budget, result.cost)
        return {u: Decision(result.choices[u]) if result.choices[u] is not None
                else Decision(None, f"kept dense by the {self.name} allocation", chosen=True) for u in units}
