"""linalg: truncated/randomized SVD, Eckart–Young, factor splitting, safe Cholesky, break-even rank."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.linalg import break_even_rank, randomized_svd, safe_cholesky, split_factors, svd_top, truncated_svd

PROPS = settings(max_examples=25, deadline=None)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(_randn(rows, cols, seed=seed))
    return Q


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ from random orthonormal U (m×k), V (n×k), k = len(s)."""
    k = s.numel()
    return _orthonormal(m, k, seed) @ torch.diag(s.to(torch.float64)) @ _orthonormal(n, k, seed + 1).T


@st.composite
def matrix_and_rank(draw):
    m = draw(st.integers(1, 24))
    n = draw(st.integers(1, 24))
    k = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 10_000))
    return _randn(m, n, seed=seed), k


@PROPS
@given(matrix_and_rank())
def test_truncated_svd_shapes_orthonormality_and_eckart_young(case):
    A, k = case
    m, n = A.shape
    U, S, Vh = truncated_svd(A, k)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    eye = torch.eye(k, dtype=A.dtype)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=1e-12)
    full = torch.linalg.svdvals(A)
    torch.testing.assert_close(S, full[:k], rtol=1e-12, atol=1e-12)
    assert (S[:-1] >= S[1:]).all()
    # Eckart–Young: ‖A − A_k‖_F = sqrt(Σ_{i>k} σ_i²)
    err = torch.linalg.matrix_norm(A - U @ torch.diag(S) @ Vh)
    expected = full[k:].pow(2).sum().sqrt()
    assert abs(err.item() - expected.item()) <= 1e-10 * max(1.0, full[0].item())


@PROPS
@given(matrix_and_rank(), st.integers(0, 10_000))
def test_truncated_svd_is_the_best_rank_k_approximation(case, seed):
    # no other rank-k matrix (here: a random one, and a perturbation of the optimum) does better
    A, k = case
    m, n = A.shape
    U, S, Vh = truncated_svd(A, k)
    best = torch.linalg.matrix_norm(A - U @ torch.diag(S) @ Vh).item()
    other = _randn(m, k, seed=seed) @ _randn(k, n, seed=seed + 1)
    assert torch.linalg.matrix_norm(A - other).item() >= best - 1e-10
    nudged = (U + 1e-3 * _randn(m, k, seed=seed + 2)) @ torch.diag(S) @ Vh
    assert torch.linalg.matrix_norm(A - nudged).item() >= best - 1e-10


def test_truncated_svd_full_rank_reconstructs():
    A = _randn(7, 4, seed=3)
    U, S, Vh = truncated_svd(A, 10)  # k is clipped to min(m, n)
    assert S.shape == (4,)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, A, rtol=0, atol=1e-12)


def test_truncated_svd_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"expected a matrix, got shape \(2, 3, 4\)"):
        truncated_svd(torch.zeros(2, 3, 4), 1)


def test_randomized_svd_matches_exact_on_decaying_spectrum():
    m, n, k = 120, 90, 10
    s = 2.0 ** -torch.arange(60, dtype=torch.float64) * 10
    A = _with_spectrum(m, n, s, seed=11)
    U, S, Vh = randomized_svd(A, k, oversample=10, power_iters=2, seed=0)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    torch.testing.assert_close(S, s[:k], rtol=1e-8, atol=0)
    # the subspaces agree too: the approximation error is the Eckart–Young optimum
    err = torch.linalg.matrix_norm(A - U @ torch.diag(S) @ Vh).item()
    assert err == pytest.approx(s[k:].pow(2).sum().sqrt().item(), rel=1e-6)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=A.dtype), rtol=0, atol=1e-10)


def test_randomized_svd_falls_back_to_exact_when_sketch_covers_matrix():
    A = _randn(30, 20, seed=5)
    # k + oversample >= min(m, n): exact result, bit for bit
    for k, over in [(5, 15), (4, 16), (20, 0), (25, 3)]:
        U, S, Vh = randomized_svd(A, k, oversample=over, seed=123)
        Ue, Se, Vhe = truncated_svd(A, k)
        assert torch.equal(S, Se) and torch.equal(U, Ue) and torch.equal(Vh, Vhe)
    # the seed does not matter then
    assert torch.equal(randomized_svd(A, 5, oversample=15, seed=1)[1], randomized_svd(A, 5, oversample=15, seed=2)[1])


def test_randomized_svd_is_deterministic_for_a_seed():
    A = _randn(80, 70, seed=9)
    a = randomized_svd(A, 5, oversample=5, power_iters=0, seed=42)
    b = randomized_svd(A, 5, oversample=5, power_iters=0, seed=42)
    c = randomized_svd(A, 5, oversample=5, power_iters=0, seed=43)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a flat random spectrum with no power iterations: another sketch gives other (worse-than-exact) values
    assert not torch.equal(a[1], c[1])
    exact = torch.linalg.svdvals(A)[:5]
    assert (a[1] <= exact + 1e-10).all()  # projections never inflate singular values


def test_svd_top_dispatch():
    A = _randn(40, 30, seed=2)
    assert torch.equal(svd_top(A, 3)[1], truncated_svd(A, 3)[1])
    assert torch.equal(
        svd_top(A, 3, solver="randomized", oversample=4, power_iters=1, seed=7)[1],
        randomized_svd(A, 3, oversample=4, power_iters=1, seed=7)[1],
    )
    with pytest.raises(ValueError, match=r"unknown solver 'qr'"):
        svd_top(A, 3, solver="qr")


@PROPS
@given(matrix_and_rank())
def test_split_factors_product(case):
    A, k = case
    U, S, Vh = truncated_svd(A, k)
    left, right = split_factors(U, S, Vh)
    assert left.shape == U.shape and right.shape == Vh.shape
    torch.testing.assert_close(left @ right, U @ torch.diag(S) @ Vh, rtol=1e-12, atol=1e-12)
    # balanced: both factors carry sqrt(S) — column norms of left equal row norms of right
    torch.testing.assert_close(left.norm(dim=0), S.sqrt(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(right.norm(dim=1), S.sqrt(), rtol=1e-10, atol=1e-12)


def test_split_factors_clamps_negative_rounding():
    U = torch.eye(2, dtype=torch.float64)
    left, right = split_factors(U, torch.tensor([4.0, -1e-20], dtype=torch.float64), U)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    torch.testing.assert_close(left @ right, torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64)))


@PROPS
@given(st.integers(1, 16), st.integers(0, 10_000))
def test_safe_cholesky_exact_on_positive_definite(n, seed):
    X = _randn(3 * n + 2, n, seed=seed)
    G = X.T @ X
    L, lam = safe_cholesky(G)
    assert lam == 0
    assert L.dtype == torch.float64
    assert torch.equal(L, L.tril())
    assert (L.diagonal() > 0).all()
    torch.testing.assert_close(L @ L.T, G, rtol=1e-12, atol=1e-10)


def test_safe_cholesky_converts_to_float64():
    X = _randn(20, 5, seed=1, dtype=torch.float32)
    L, lam = safe_cholesky(X.T @ X)
    assert L.dtype == torch.float64 and lam == 0
    torch.testing.assert_close(L @ L.T, (X.T @ X).double(), rtol=1e-10, atol=1e-10)


def _check_damped(G: torch.Tensor, L: torch.Tensor, lam: float) -> None:
    assert lam > 0
    assert torch.isfinite(L).all()
    scale = G.diagonal().mean().item()
    expected = G + lam * scale * torch.eye(G.shape[0], dtype=G.dtype)
    torch.testing.assert_close(L @ L.T, expected, rtol=1e-10, atol=1e-10 * scale)
    # the damping is the smallest tried: 1e-6 · 10^j
    assert math.log10(lam / 1e-6) == pytest.approx(round(math.log10(lam / 1e-6)), abs=1e-9)


@pytest.mark.parametrize("tokens, n", [(3, 8), (10, 12), (1, 4), (30, 64)])
@pytest.mark.parametrize("seed", range(20))
def test_safe_cholesky_damps_gram_of_too_few_tokens(tokens, n, seed):
    X = _randn(tokens, n, seed=seed)
    G = X.T @ X  # rank <= tokens < n: only positive semi-definite
    L, lam = safe_cholesky(G)
    _check_damped(G, L, lam)


def test_safe_cholesky_damps_dead_channel():
    X = _randn(50, 6, seed=4)
    X[:, 2] = 0  # a channel that never fires
    G = X.T @ X
    L, lam = safe_cholesky(G)
    _check_damped(G, L, lam)
    assert lam == 1e-6  # the first damping already suffices


def test_safe_cholesky_zero_gram():
    L, lam = safe_cholesky(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.isfinite(L).all() and lam > 0 and (L.diagonal() > 0).all()


def test_safe_cholesky_symmetrises():
    X = _randn(20, 4, seed=6)
    G = X.T @ X
    skew = G.clone()
    skew[0, 1] += 1e-9  # slightly asymmetric rounding, as from accumulated float sums
    L, lam = safe_cholesky(skew)
    assert lam == 0
    torch.testing.assert_close(L @ L.T, (skew + skew.T) / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("G", [torch.zeros(3, 4), torch.zeros(4), torch.zeros(2, 2, 2)])
def test_safe_cholesky_rejects_non_square(G):
    with pytest.raises(ValueError, match=r"must be square"):
        safe_cholesky(G)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_safe_cholesky_rejects_non_finite(bad):
    G = torch.eye(3, dtype=torch.float64)
    G[1, 2] = bad
    with pytest.raises(ValueError, match=r"non-finite"):
        safe_cholesky(G)


def test_safe_cholesky_gives_up_on_indefinite():
    G = torch.diag(torch.tensor([1.0, -5.0, 1.0], dtype=torch.float64))  # mean diag < 0 -> scale tiny
    with pytest.raises(ValueError, match=r"not positive definite even with damping"):
        safe_cholesky(G, max_tries=3)


@pytest.mark.parametrize(
    "m, n, expected",
    [(4, 4, 2.0), (768, 768, 384.0), (768, 3072, 614.4), (4096, 11008, 4096 * 11008 / 15104), (1, 7, 0.875), (1, 1, 0.5)],
)
def test_break_even_rank(m, n, expected):
    assert break_even_rank(m, n) == pytest.approx(expected, rel=1e-15)
    assert break_even_rank(n, m) == pytest.approx(expected, rel=1e-15)


@PROPS
@given(st.integers(1, 5000), st.integers(1, 5000))
def test_break_even_rank_equalises_parameters(m, n):
    r = break_even_rank(m, n)
    assert r * (m + n) == pytest.approx(m * n, rel=1e-12)
    assert r <= min(m, n) / 1 and r >= min(m, n) / 2
