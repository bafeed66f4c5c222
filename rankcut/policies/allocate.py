"""The allocator behind the global policies: one option per unit, least total cost, within a budget. Pure.

Each unit offers options ``(resource, cost, choice)``: a rank (or dense) with what it spends of the budget
(parameters, or predicted decode seconds) and what it costs in quality (measured sensitivity, truncation
loss). Choosing one option per unit to minimise Σ cost subject to Σ resource ≤ budget is a multiple-choice
knapsack problem.

- :func:`solve_exact`: dynamic programming over the budget in units of the resources' greatest common divisor
  (exact; used when integer resources make the table small enough, as parameter budgets of models up to a few
  billion parameters with ranks on a grid of 8 do).
- :func:`solve_greedy`: the convex hull of each unit's (resource, cost) curve, then its segments in order of
  steepest cost decrease per resource unit (the Lagrangian relaxation, Everett 1963): optimal for the budget it
  ends at when it stops at a hull vertex; otherwise within one segment of the optimum. For real-valued
  resources (seconds) or tables too large for the exact solver.

:func:`allocate` picks the exact solver when it can and says which it used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np


@dataclass
class Curve:
    """The options of one unit. ``points`` are ``(resource, cost, choice)``; ``key`` identifies the unit."""

    key: Any
    points: list[tuple[float, float, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError(f"unit {self.key!r} offers no option")
        for resource, cost, _ in self.points:
            if not (math.isfinite(resource) and math.isfinite(cost)) or resource < 0:
                raise ValueError(f"unit {self.key!r}: option with resource {resource} and cost {cost} is not valid")

    @property
    def cheapest(self) -> float:
        return min(p[0] for p in self.points)


@dataclass
class Allocation:
    """The chosen option per unit, what it spends and costs in all, and which solver found it."""

    choices: dict[Any, Any]
    resource: float
    cost: float
    solver: str


def check_feasible(curves: list[Curve], budget: float) -> None:
    """Raise ValueError when even the smallest option of every unit overspends ``budget``."""
    need = sum(c.cheapest for c in curves)
    if need > budget * (1 + 1e-12):
        raise ValueError(f"the budget cannot be met: the smallest allocation (every unit at its least costly option) needs "
                         f"{need:,.6g}, the budget is {budget:,.6g}")


def lower_hull(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The vertices of the lower convex hull of ``(resource, cost)`` points, resource ascending, cost strictly
    decreasing (an option that costs more than a cheaper-in-resource one is never chosen)."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    best: list = []
    for p in pts:  # keep, per resource, the lowest cost; drop points not below every smaller-resource point
        if best and p[0] == best[-1][0]:
            continue
        if best and p[1] >= best[-1][1]:
            continue
        best.append(p)
    hull: list = []
    for p in best:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            lhs, rhs = (y2 - y1) * (p[0] - x1), (p[1] - y1) * (x2 - x1)
            # hull[-1] above the chord: drop it; collinear points (to rounding) stay, each is a reachable step
            if lhs - rhs > 1e-12 * max(abs(lhs), abs(rhs), 1e-300):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def solve_greedy(curves: list[Curve], budget: float) -> Allocation:
    """Lagrangian greedy on the convex hulls (see the module docstring)."""
    check_feasible(curves, budget)
    hulls = [lower_hull(c.points) for c in curves]
    at = [0] * len(curves)
    spent = sum(h[0][0] for h in hulls)
    segments = []
    for u, h in enumerate(hulls):
        slope = -math.inf
        for i in range(1, len(h)):
            d_resource, d_cost = h[i][0] - h[i - 1][0], h[i][1] - h[i - 1][1]
            # the hull keeps points collinear to rounding, whose slopes can come out a few ulps steeper than the
            # step before: never let a unit's later step sort ahead of its earlier one (it would be skipped)
            slope = max(slope, d_cost / d_resource)
            segments.append((slope, u, i, d_resource))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    closed = set()
    for _, u, i, d_resource in segments:
        if u in closed or at[u] != i - 1:
            continue
        if spent + d_resource > budget * (1 + 1e-12):
            closed.add(u)  # this unit's next step does not fit; later (flatter) steps of it cannot come first
            continue
        at[u], spent = i, spent + d_resource
    chosen = {c.key: h[i][2] for c, h, i in zip(curves, hulls, at)}
    cost = sum(h[i][1] for h, i in zip(hulls, at))
    return Allocation(chosen, spent, cost, "greedy")


def _quantum(curves: list[Curve]) -> int | None:
    values = [p[0] for c in curves for p in c.points]
    if not all(float(v).is_integer() for v in values):
        return None
    return reduce(math.gcd, (int(v) for v in values if v), 0) or 1


def table_size(curves: list[Curve], budget: float) -> int | None:
    """Work of :func:`solve_exact` (options × budget states), or None when the resources are not integers."""
    q = _quantum(curves)
    if q is None:
        return None
    return (int(budget) // q + 1) * sum(len(c.points) for c in curves)


def solve_exact(curves: list[Curve], budget: float) -> Allocation:
    """Exact dynamic programming over the budget (integer resources).

    Raises:
        ValueError: non-integer resources, or an infeasible budget.
    """
    check_feasible(curves, budget)
    q = _quantum(curves)
    if q is None:
        raise ValueError("the exact solver needs integer resources")
    states = int(budget) // q + 1
    best = np.full(states, np.inf)
    best[0] = 0.0
    picks = []
    for curve in curves:
        new = np.full(states, np.inf)
        pick = np.full(states, -1, dtype=np.int32)
        for j, (resource, cost, _) in enumerate(curve.points):
            s = int(resource) // q
            if s >= states:
                continue
            candidate = best[: states - s] + cost
            better = candidate < new[s:]
            new[s:][better] = candidate[better]
            pick[s:][better] = j
        best = new
        picks.append(pick)
    low = float(np.min(best))
    if not math.isfinite(low):
        raise ValueError("the budget cannot be met")
    # the least cost; among (numerically) equal costs the largest resource: spend the budget rather than leave it
    end = int(np.nonzero(best <= low + 1e-12 * max(1.0, abs(low)))[0][-1])
    cost = float(best[end])
    choices, state, resource = {}, end, 0.0
    for curve, pick in zip(reversed(curves), reversed(picks)):
        j = int(pick[state])
        choices[curve.key] = curve.points[j][2]
        resource += curve.points[j][0]
        state -= int(curve.points[j][0]) // q
    return Allocation({c.key: choices[c.key] for c in curves}, resource, cost, "exact")


def allocate(curves: list[Curve], budget: float, exact_limit: int = 50_000_000) -> Allocation:
    """The least-cost choice of one option per unit within ``budget``: exact when the table is small enough
    (``exact_limit`` options × states), else the Lagrangian greedy.

    Raises:
        ValueError: the budget cannot be met (the message says how much the smallest allocation needs).
    """
    size = table_size(curves, budget)
    if size is not None and size <= exact_limit:
        return solve_exact(curves, budget)
    return solve_greedy(curves, budget)
