"""Rank allocation through factorize: uniform keep, fixed rank, energy threshold, break-even, overrides."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.policies.energy import energy_rank
from rankcut.policies.overrides import allocation_for
from rankcut.units import max_useful_rank, uniform_rank
from rankcut.config import CompressConfig
from rankcut.factorize import factorize

PROPS = settings(max_examples=25, deadline=None)
F64 = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with U (m×k), V (n×k) random with orthonormal columns, k = len(s)."""
    k = s.numel()
    U, _ = torch.linalg.qr(_randn(m, k, seed=seed))
    V, _ = torch.linalg.qr(_randn(n, k, seed=seed + 1))
    return U @ torch.diag(s.to(F64)) @ V.T


def _smallest_rank(s: torch.Tensor, threshold: float) -> int:
    """Reference: the smallest r with Σ_{i≤r} s_i² ≥ threshold · Σ s_i², by a plain loop."""
    total = float((s.to(F64) ** 2).sum())
    acc = 0.0
    for r, value in enumerate(s.tolist(), start=1):
        acc += value * value
        if acc >= threshold * total:
            return r
    raise AssertionError("unreachable for threshold <= 1")


# --------------------------------------------------------------------------------------------- uniform


@pytest.mark.parametrize(
    "m, n, keep, expected",
    [
        (768, 768, 0.5, 192),  # r* = 384
        (768, 3072, 0.8, 491),  # r* = 614.4, 0.8 r* = 491.52
        (4096, 11008, 0.6, 1791),  # r* = 2985.1..., 0.6 r* = 1791.08
        (10, 10, 0.1, 1),  # floor(0.5) = 0 -> at least 1
        (4, 4, 0.4, 1),
        (6, 10, 0.9, 3),  # r* = 3.75, 0.9 r* = 3.375
    ],
)
def test_uniform_rank_formula(m, n, keep, expected):
    assert uniform_rank(m, n, keep) == expected
    assert uniform_rank(n, m, keep) == expected


@PROPS
@given(st.integers(2, 24), st.integers(2, 24), st.floats(0.01, 0.99), st.integers(0, 1000))
def test_uniform_keep_through_factorize(m, n, keep, seed):
    W = _randn(m, n, seed=seed)
    # the documented formula in floating point, as rankcut computes it (an exact rational product can fall 1 ulp
    # below an integer where the float product rounds onto it: keep = 1/3, m = n = 12)
    expected = max(1, math.floor(keep * (m * n / (m + n))))
    f = factorize(W, "svd", {"keep": keep}, svd_dtype=F64)
    if Fraction(expected) >= Fraction(m * n, m + n):  # at or above break-even: dense
        assert f.U is None and f.V is None and f.rank is None
        assert "break-even" in f.reason
    else:
        assert f.rank == expected, f.reason
        assert f.U.shape == (m, expected) and f.V.shape == (expected, n)
        assert expected * (m + n) < m * n  # the factors are smaller than W
        assert expected * (m + n) <= keep * m * n or expected == 1
        S = torch.linalg.svdvals(W)
        err = torch.linalg.matrix_norm(W - f.U @ f.V).item()
        assert err == pytest.approx(S[expected:].pow(2).sum().sqrt().item(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("m, n", [(6, 10), (10, 6), (8, 8), (5, 3), (7, 13), (1, 9)])
def test_keep_one_stays_dense(m, n):
    W = _randn(m, n, seed=m * n)
    f = factorize(W, "svd", {"keep": 1.0})
    assert f.U is None and f.V is None and f.rank is None
    assert "break-even" in f.reason


@pytest.mark.parametrize(
    "m, n, rank, dense",
    [
        (8, 8, 4, True),  # r* = 4 exactly
        (8, 8, 3, False),
        (6, 10, 4, True),  # r* = 3.75
        (6, 10, 3, False),
        (6, 10, 6, True),
        (6, 10, 100, True),
        (3, 3, 1, False),  # r* = 1.5
        (2, 2, 1, True),  # r* = 1
        (1, 50, 1, True),  # r* < 1: nothing pays
    ],
)
def test_fixed_rank_at_or_above_break_even_stays_dense(m, n, rank, dense):
    W = _randn(m, n, seed=rank)
    f = factorize(W, "svd", {"rank": rank}, svd_dtype=F64)
    if dense:
        assert f.U is None and f.V is None and f.rank is None
        assert "break-even" in f.reason
        assert rank >= m * n / (m + n)
    else:
        assert f.rank == rank and f.U.shape == (m, rank) and f.V.shape == (rank, n)
        assert rank * (m + n) < m * n


@pytest.mark.parametrize("m, n, expected", [(8, 8, 3), (6, 10, 3), (3, 3, 1), (2, 2, 0), (1, 50, 0), (768, 3072, 614)])
def test_max_useful_rank(m, n, expected):
    assert max_useful_rank(m, n) == expected
    assert expected < m * n / (m + n) <= expected + 1


def test_dense_override_allocation():
    f = factorize(_randn(8, 8), "svd", {"dense": True})
    assert f.U is None and f.rank is None and f.reason == "dense by override"


# ---------------------------------------------------------------------------------------------- energy

# s² = 64, 16, 4, 1, 0.25, ... : cumulative fractions 0.75, 0.9375, 0.984, ...
SPECTRUM = 8.0 * 0.5 ** torch.arange(20, dtype=F64)


_W_60x50 = _with_spectrum(60, 50, SPECTRUM, seed=3)


@PROPS
@given(st.floats(0.01, 1.0), st.sampled_from(["exact", "randomized"]))
def test_energy_picks_smallest_rank(threshold, solver):
    # r* = 27.3: every rank this spectrum needs is below it; the sketch (27 + 4 < 50) is really randomized
    s, W = SPECTRUM, _W_60x50
    cumulative = torch.cumsum(s**2, 0) / (s**2).sum()
    # stay clear of the exact boundaries, where rounding in ‖W‖_F² may move the answer by one
    if (cumulative - threshold).abs().min() < 1e-9:
        return
    expected = _smallest_rank(s, threshold)
    f = factorize(W, "svd", {"energy": threshold}, solver=solver, oversample=4, power_iters=2, svd_dtype=F64)
    assert f.rank == expected, f.reason
    assert f.energy >= threshold * (1 - 1e-12)
    if expected > 1:
        assert float(cumulative[expected - 2]) < threshold  # one fewer would not do
    err = torch.linalg.matrix_norm(W - f.U @ f.V).item()
    assert err == pytest.approx(s[expected:].pow(2).sum().sqrt().item(), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("threshold, expected", [(0.5, 1), (0.75, 1), (0.8, 2), (0.95, 3), (0.99, 4)])
def test_energy_table(threshold, expected, solver):
    W = _with_spectrum(100, 100, SPECTRUM, seed=8)  # big enough that the randomized sketch is really used
    f = factorize(W, "svd", {"energy": threshold}, solver=solver, oversample=8, power_iters=2, svd_dtype=F64)
    assert f.rank == expected, f.reason


def test_energy_solvers_agree_on_decaying_spectrum():
    s = 0.8 ** torch.arange(100, dtype=F64)
    W = _with_spectrum(100, 100, s, seed=1)  # r* = 50, limit 49, sketch 49 + 16 < 100: the randomized path
    for threshold in (0.5, 0.7, 0.9, 0.99):
        exact = factorize(W, "svd", {"energy": threshold}, svd_dtype=F64)
        rand = factorize(W, "svd", {"energy": threshold}, solver="randomized", svd_dtype=F64, seed=5)
        assert exact.rank == rand.rank == _smallest_rank(s, threshold)
        torch.testing.assert_close(rand.U @ rand.V, exact.U @ exact.V, rtol=1e-8, atol=1e-8)


def test_energy_one_on_low_rank_matrix():
    s = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    W = _with_spectrum(20, 16, s, seed=2)  # rank 3 exactly
    f = factorize(W, "svd", {"energy": 1.0}, svd_dtype=F64)
    assert f.rank == 3
    assert f.energy == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(f.U @ f.V, W, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_energy_needing_break_even_stays_dense(solver):
    m, n = 40, 30  # r* = 17.14: rank 17 is the largest allowed
    s = torch.ones(30, dtype=F64)  # flat: r singular values hold r/30 of the energy
    W = _with_spectrum(m, n, s, seed=4)
    dense = factorize(W, "svd", {"energy": 0.6}, solver=solver, svd_dtype=F64)  # needs 18
    assert dense.U is None and dense.rank is None
    assert "break-even" in dense.reason and "energy" in dense.reason
    ok = factorize(W, "svd", {"energy": 0.55}, svd_dtype=F64)  # needs 17 = 16.5 rounded up
    assert ok.rank == 17


def test_energy_rank_helper():
    S = torch.tensor([2.0, 1.0, 1.0], dtype=F64)  # squares 4, 1, 1 of total 6
    assert energy_rank(S, 6.0, 0.5) == 1
    assert energy_rank(S, 6.0, 4 / 6) == 1  # exactly on the boundary counts
    assert energy_rank(S, 6.0, 0.7) == 2
    assert energy_rank(S, 6.0, 1.0) == 3
    assert energy_rank(S, 12.0, 0.9) is None  # the given top of the spectrum never reaches it
    assert energy_rank(S, 0.0, 0.9) == 1


def test_energy_kept_fraction_reported():
    W = _with_spectrum(30, 30, SPECTRUM[:10], seed=6)
    f = factorize(W, "svd", {"rank": 2}, svd_dtype=F64)
    assert f.energy == pytest.approx(80 / (SPECTRUM[:10] ** 2).sum().item(), rel=1e-10)


# ------------------------------------------------------------------------------------------ overrides


def test_allocation_for_first_match_wins():
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    cfg = CompressConfig(
        method="svd",
        keep=0.7,
        overrides={"re:mlp": {"keep": 0.5}, "model.layers.0.mlp.down_proj": {"rank": 2}, "re:q_proj$": {"dense": True}},
    )
    assert [allocation_for(n, cfg) for n in names] == [{"keep": 0.5}, {"keep": 0.5}, {"dense": True}]
    reordered = CompressConfig(
        method="svd", keep=0.7, overrides={"model.layers.0.mlp.down_proj": {"rank": 2}, "re:mlp": {"keep": 0.5}}
    )
    assert allocation_for(names[0], reordered) == {"rank": 2}
    assert allocation_for(names[1], reordered) == {"keep": 0.5}
    assert allocation_for(names[2], reordered) == {"keep": 0.7}  # no match: the global allocation


def test_allocation_for_exact_vs_regex():
    cfg = CompressConfig(method="svd", energy=0.9, overrides={"layers.1.mlp": {"rank": 3}, "re:layers\\.1\\.": {"keep": 0.4}})
    assert allocation_for("layers.1.mlp", cfg) == {"rank": 3}  # exact
    assert allocation_for("model.layers.1.mlp", cfg) == {"keep": 0.4}  # exact does not match a longer name
    assert allocation_for("layers.1.attn", cfg) == {"keep": 0.4}
    assert allocation_for("layers.10.mlp", cfg) == {"energy": 0.9}  # escaped dot: 10 is not 1.
    assert allocation_for("layers.1.mlp.c_fc", cfg) == {"keep": 0.4}


def test_allocation_for_drops_unset_keys():
    cfg = CompressConfig(
        method="svd", rank=5, overrides={"a": {"dense": False, "keep": 0.3}, "b": {"dense": False}, "c": {"keep": None}}
    )
    assert allocation_for("a", cfg) == {"keep": 0.3}
    # an override that sets nothing means the global allocation, which factorize can use
    assert allocation_for("b", cfg) == {"rank": 5}
    assert allocation_for("c", cfg) == {"rank": 5}
    f = factorize(_randn(12, 12), "svd", allocation_for("b", cfg), svd_dtype=F64)
    assert f.rank == 5


def test_default_global_allocation():
    assert allocation_for("anything", CompressConfig(method="svd")) == {"keep": 0.8}


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_factorize_rejects_non_finite_weight(bad):
    W = _randn(6, 6)
    W[2, 3] = bad
    with pytest.raises(ValueError, match=r"non-finite"):
        factorize(W, "svd", {"rank": 1})
    with pytest.raises(ValueError, match=r"non-finite"):
        factorize(W, "svd", {"dense": True})  # checked before anything else


def test_factorize_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'nope'"):
        factorize(_randn(6, 6), "nope", {"rank": 1})
