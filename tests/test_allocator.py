"""The allocator of the global policies against brute force (multiple-choice knapsack)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.policies.allocate import Curve, allocate, lower_hull, solve_exact, solve_greedy


def brute_force(curves, budget):
    best = None
    for combo in itertools.product(*[c.points for c in curves]):
        resource = sum(p[0] for p in combo)
        if resource <= budget:
            cost = sum(p[1] for p in combo)
            if best is None or cost < best[0] - 1e-12:
                best = (cost, resource)
    return best


@st.composite
def problems(draw, convex=False, integer=True):
    n_units = draw(st.integers(1, 4))
    curves = []
    for u in range(n_units):
        step = draw(st.integers(1, 5))
        n = draw(st.integers(1, 5))
        costs = sorted((draw(st.floats(0, 10, allow_nan=False)) for _ in range(n)), reverse=True)
        if convex:  # decreasing, with decreasing decrements
            drops = sorted((draw(st.floats(0, 3, allow_nan=False)) for _ in range(n - 1)), reverse=True)
            costs = [10.0]
            for d in drops:
                costs.append(costs[-1] - d)
        points = [((i + 1) * step if integer else (i + 1) * step * 0.37, c, i) for i, c in enumerate(costs)]
        curves.append(Curve(u, points))
    low = sum(c.cheapest for c in curves)
    high = sum(max(p[0] for p in c.points) for c in curves)
    budget = draw(st.integers(int(low), int(high) + 1)) if integer else draw(st.floats(low, high + 1))
    return curves, budget


@settings(max_examples=300, deadline=None)
@given(problems())
def test_exact_solver_equals_brute_force(problem):
    curves, budget = problem
    got = solve_exact(curves, budget)
    expected = brute_force(curves, budget)
    assert got.cost == pytest.approx(expected[0], abs=1e-9)
    assert got.resource <= budget
    chosen = {c.key: next(p for p in c.points if p[2] == got.choices[c.key]) for c in curves}
    assert sum(p[0] for p in chosen.values()) == got.resource  # the budget is met exactly as reported


@settings(max_examples=300, deadline=None)
@given(problems(convex=True))
def test_greedy_is_exact_on_convex_curves_with_equal_steps_per_unit(problem):
    """Convex curves with one resource step per unit: the marginal greedy is optimal at every budget when every
    unit's step is the same; with different steps it never overspends and never beats the optimum."""
    curves, budget = problem
    got = solve_greedy(curves, budget)
    expected = brute_force(curves, budget)
    assert got.resource <= budget + 1e-9
    assert got.cost >= expected[0] - 1e-9
    if len({c.points[0][0] for c in curves}) == 1:
        assert got.cost == pytest.approx(expected[0], abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(problems(integer=False))
def test_greedy_never_overspends_real_budgets(problem):
    curves, budget = problem
    got = allocate(curves, budget)
    assert got.solver == "greedy" and got.resource <= budget * (1 + 1e-12)
    # real budgets are met to a relative 1e-12 (0.37 · 3 + 0.74 is 1.85, one ulp above 1.8499999999999999)
    assert got.cost >= brute_force(curves, budget * (1 + 1e-12))[0] - 1e-9


def test_everett_optimality_at_hull_vertices():
    """Stopping exactly on hull vertices, the greedy equals the optimum for that budget."""
    curves = [Curve("a", [(2, 10, 1), (4, 4, 2), (6, 3, 3)]), Curve("b", [(3, 9, 1), (6, 5, 2), (9, 4.5, 3)])]
    for budget in (5, 7, 10, 13, 15):
        got = solve_greedy(curves, budget)
        assert got.cost == pytest.approx(brute_force(curves, got.resource)[0])
        assert got.cost == pytest.approx(solve_exact(curves, budget).cost) or got.resource < budget


def test_lower_hull_drops_dominated_and_concave_points():
    pts = [(1, 10, "a"), (2, 9.9, "b"), (3, 5, "c"), (4, 6, "d"), (5, 1, "e")]
    assert [p[2] for p in lower_hull(pts)] == ["a", "c", "e"]  # b above the chord, d costs more than c
    line = [(1, 3, "a"), (2, 2, "b"), (3, 1, "c")]
    assert [p[2] for p in lower_hull(line)] == ["a", "b", "c"]  # collinear points stay: each is a reachable step


def test_infeasible_budget_is_a_clear_error():
    curves = [Curve("a", [(5, 1, 1), (9, 0, 2)]), Curve("b", [(4, 1, 1)])]
    for solver in (solve_exact, solve_greedy, allocate):
        with pytest.raises(ValueError, match=r"budget cannot be met: the smallest allocation .* needs 9"):
            solver(curves, 8)


def test_exact_is_chosen_when_small():
    curves = [Curve("a", [(8, 3, 1), (16, 1, 2)]), Curve("b", [(8, 2, 1), (16, 0.5, 2)])]
    assert allocate(curves, 24).solver == "exact"
    assert allocate(curves, 24, exact_limit=1).solver == "greedy"


def test_found_by_hypothesis_collinear_steps_and_a_one_ulp_budget():
    """Two cases a fresh example database found: a middle point collinear with its neighbours only to rounding
    must stay a reachable step; a budget one ulp below the sum is met to the relative tolerance."""
    line = Curve(0, [(2, 10.0, 0), (4, 8.967225766811492, 1), (6, 7.934451533622982, 2)])
    assert solve_greedy([line], 4).cost == pytest.approx(8.967225766811492)
    curves = [Curve(0, [(0.37, 0.0, 0)]), Curve(1, [(0.37, 0.0, 0)]), Curve(2, [(0.37, 1.0, 0), (0.74, 0.0, 1)]),
              Curve(3, [(0.37, 0.0, 0)])]
    got = allocate(curves, 1.8499999999999999)
    assert got.resource <= 1.8499999999999999 * (1 + 1e-12)
    assert got.cost >= brute_force(curves, 1.8499999999999999 * (1 + 1e-12))[0] - 1e-9


def test_greedy_takes_every_step_of_a_curve_collinear_to_rounding():
    """Found by hypothesis: the second drop is 4e-16 larger than the first, the hull keeps the middle point, and
    the greedy used to sort that unit's second step ahead of its first and then skip it."""
    curve = Curve(0, [(3, 10.0, 0), (6, 8.993924406557271, 1), (9, 7.9878488131145415, 2)])
    got = solve_greedy([curve], 9)
    assert got.choices == {0: 2} and got.cost == pytest.approx(7.9878488131145415)
