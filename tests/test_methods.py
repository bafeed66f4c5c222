"""Decomposition methods: the registry, and the identities that define svd, asvd and whiten."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.units import max_useful_rank
from rankcut.factorize import factorize
from rankcut.linalg import safe_cholesky
from rankcut.methods import Preconditioned, _REGISTRY, available_methods, get_method, register
from rankcut.methods.asvd import asvd, asvd_scales
from rankcut.methods.svd import svd
from rankcut.methods.whiten import whiten

PROPS = settings(max_examples=25, deadline=None)
F64 = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _product(f) -> torch.Tensor:
    assert f.U is not None and f.V is not None, f.reason
    return f.U @ f.V


def _out_err(W: torch.Tensor, W2: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − W′) Xᵀ‖_F for calibration inputs X (tokens × n)."""
    return torch.linalg.matrix_norm((W - W2) @ X.T).item()


# ---------------------------------------------------------------------------------------------- registry


def test_available_methods():
    names = available_methods()
    assert {"svd", "asvd", "whiten"} <= set(names)
    assert names == sorted(names)


def test_get_method_specs():
    assert get_method("svd").stat is None
    assert get_method("asvd").stat == "absmean"
    assert get_method("whiten").stat == "gram"
    assert get_method("svd").fn is svd and get_method("whiten").fn is whiten and get_method("asvd").fn is asvd
    for name in ("svd", "asvd", "whiten"):
        assert get_method(name).name == name
        assert get_method(name).reference  # each method cites its paper


def test_get_method_unknown_lists_names():
    with pytest.raises(ValueError) as info:
        get_method("tsvd")
    message = str(info.value)
    assert "unknown method 'tsvd'" in message
    for name in available_methods():
        assert name in message


def test_register_duplicate_raises():
    with pytest.raises(ValueError, match=r"method 'svd' is already registered"):
        register("svd")(lambda W, stat=None: Preconditioned(W, lambda R: R))
    assert get_method("svd").fn is svd  # the original survives


def test_register_new_method_is_usable():
    name = "_test_scaled_identity"
    try:

        @register(name, stat=None, reference="test")
        def doubled(W, stat=None):
            return Preconditioned(A=2 * W, unapply=lambda R: R / 2)

        assert name in available_methods()
        W = _randn(6, 6, seed=1)
        f = factorize(W, name, {"rank": 2}, svd_dtype=F64)
        g = factorize(W, "svd", {"rank": 2}, svd_dtype=F64)
        torch.testing.assert_close(_product(f), _product(g), rtol=1e-12, atol=1e-12)
    finally:
        _REGISTRY.pop(name, None)
    assert name not in available_methods()


# --------------------------------------------------------------------------------------------------- svd


@st.composite
def weight_and_rank(draw, min_side: int = 3, max_side: int = 14):
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    r = draw(st.integers(1, max_useful_rank(m, n)))  # >= 1 for sides >= 3
    seed = draw(st.integers(0, 10_000))
    return _randn(m, n, seed=seed), r, seed


@PROPS
@given(weight_and_rank())
def test_svd_factorize_is_eckart_young(case):
    W, r, _ = case
    f = factorize(W, "svd", {"rank": r}, svd_dtype=F64)
    m, n = W.shape
    assert f.rank == r and f.U.shape == (m, r) and f.V.shape == (r, n)
    S = torch.linalg.svdvals(W)
    err = torch.linalg.matrix_norm(W - _product(f)).item()
    assert err == pytest.approx(S[r:].pow(2).sum().sqrt().item(), rel=1e-9, abs=1e-12)
    assert f.energy == pytest.approx((S[:r].pow(2).sum() / S.pow(2).sum()).item(), rel=1e-12)


@pytest.mark.parametrize("m, n", [(6, 10), (10, 6), (9, 9), (3, 40)])
def test_svd_at_full_useful_rank_reproduces_low_rank_weight(m, n):
    r = max_useful_rank(m, n)
    W = _randn(m, r, seed=m) @ _randn(r, n, seed=n)  # rank exactly r, below break-even
    f = factorize(W, "svd", {"rank": r}, svd_dtype=F64)
    assert f.rank == r
    torch.testing.assert_close(_product(f), W, rtol=1e-10, atol=1e-10)
    assert f.energy == pytest.approx(1.0, rel=1e-12)


def test_svd_method_is_identity_preconditioner():
    W = _randn(4, 5)
    pre = svd(W)
    assert pre.A is W
    R = _randn(2, 5, seed=1)
    assert torch.equal(pre.unapply(R), R)


def test_factorize_float32_default_dtype():
    W = _randn(12, 8, seed=3).float()
    f = factorize(W, "svd", {"rank": 3})
    assert f.U.dtype == torch.float32 and f.V.dtype == torch.float32
    S = torch.linalg.svdvals(W.double())
    err = torch.linalg.matrix_norm(W.double() - _product(f).double()).item()
    assert err == pytest.approx(S[3:].pow(2).sum().sqrt().item(), rel=1e-4)


# -------------------------------------------------------------------------------------------------- asvd


def test_asvd_scales_values():
    absmean = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=F64)
    s = asvd_scales(absmean, alpha=0.5)
    torch.testing.assert_close(s[:3], torch.tensor([2.0, 1.0, 0.5], dtype=F64))
    # a dead channel is lifted to floor · max, so S stays invertible
    assert s[3].item() == pytest.approx((1e-6 * 4.0) ** 0.5)
    torch.testing.assert_close(asvd_scales(absmean[:3], alpha=0.0), torch.ones(3, dtype=F64))
    torch.testing.assert_close(asvd_scales(absmean[:3], alpha=1.0), absmean[:3])
    with pytest.raises(ValueError, match="non-finite"):
        asvd_scales(torch.tensor([1.0, float("nan")]))


@PROPS
@given(weight_and_rank(), st.floats(0.0, 2.0))
def test_asvd_unapply_inverts_scaling(case, alpha):
    W, _, seed = case
    absmean = _randn(W.shape[1], seed=seed + 1).abs() + 0.05
    pre = asvd(W, absmean, alpha=alpha)
    torch.testing.assert_close(pre.A, W * absmean.pow(alpha), rtol=1e-12, atol=0)
    torch.testing.assert_close(pre.unapply(pre.A), W, rtol=1e-12, atol=1e-14)
    R = _randn(3, W.shape[1], seed=seed + 2)
    torch.testing.assert_close(pre.unapply(R) * absmean.pow(alpha), R, rtol=1e-12, atol=1e-14)


@PROPS
@given(weight_and_rank())
def test_asvd_alpha_zero_equals_svd(case):
    W, r, seed = case
    absmean = _randn(W.shape[1], seed=seed + 1).abs() + 0.05
    a = factorize(W, "asvd", {"rank": r}, stat=absmean, svd_dtype=F64, options={"alpha": 0.0})
    s = factorize(W, "svd", {"rank": r}, svd_dtype=F64)
    torch.testing.assert_close(_product(a), _product(s), rtol=1e-9, atol=1e-9)


@PROPS
@given(weight_and_rank())
def test_asvd_truncation_error_in_scaled_norm(case):
    # ASVD minimises ‖(W − W′) S‖_F with S = diag(s); that error is the dropped spectrum of W S.
    W, r, seed = case
    absmean = _randn(W.shape[1], seed=seed + 1).abs() + 0.05
    f = factorize(W, "asvd", {"rank": r}, stat=absmean, svd_dtype=F64, options={"alpha": 0.5})
    s = absmean.sqrt()
    err = torch.linalg.matrix_norm((W - _product(f)) * s).item()
    dropped = torch.linalg.svdvals(W * s)[r:]
    assert err == pytest.approx(dropped.pow(2).sum().sqrt().item(), rel=1e-8, abs=1e-10)
    # and no worse than plain SVD in that norm
    plain = factorize(W, "svd", {"rank": r}, svd_dtype=F64)
    assert err <= torch.linalg.matrix_norm((W - _product(plain)) * s).item() + 1e-10


def test_asvd_alpha_is_passed_through_factorize():
    W = _randn(10, 8, seed=2)
    absmean = torch.linspace(0.1, 5.0, 8, dtype=F64)
    half = factorize(W, "asvd", {"rank": 2}, stat=absmean, svd_dtype=F64)  # default alpha 0.5
    one = factorize(W, "asvd", {"rank": 2}, stat=absmean, svd_dtype=F64, options={"alpha": 1.0})
    assert not torch.allclose(_product(half), _product(one))
    explicit = factorize(W, "asvd", {"rank": 2}, stat=absmean, svd_dtype=F64, options={"alpha": 0.5})
    torch.testing.assert_close(_product(half), _product(explicit), rtol=0, atol=0)
    # an option the method does not take is an error, not silently dropped
    with pytest.raises(ValueError, match=r"method 'asvd' has no option\(s\) unused"):
        factorize(W, "asvd", {"rank": 2}, stat=absmean, options={"alpha": 1.0, "unused": 3})
    with pytest.raises(ValueError, match=r"method 'svd' has no option\(s\) alpha"):
        factorize(W, "svd", {"rank": 2}, options={"alpha": 1.0})


def test_register_checks_the_config_matches_the_function():
    """A spectral method's config dataclass is exactly its function's options: a mismatch fails at registration."""
    from dataclasses import dataclass

    from rankcut.methods import SpectralConfig

    @dataclass(frozen=True)
    class TwoConfig(SpectralConfig):
        beta: float = 1.0

    with pytest.raises(ValueError, match=r"options of <lambda> \(\['gamma'\]\) differ from TwoConfig \(\['beta'\]\)"):
        register("_test_mismatch", config=TwoConfig)(lambda W, stat, gamma=1.0: Preconditioned(W, lambda R: R))
    assert "_test_mismatch" not in available_methods()


# ------------------------------------------------------------------------------------------------ whiten


@st.composite
def weight_calib_rank(draw):
    W, r, seed = draw(weight_and_rank())
    tokens = draw(st.integers(3 * W.shape[1], 6 * W.shape[1]))
    # channels with very different magnitudes, as in real activations
    X = _randn(tokens, W.shape[1], seed=seed + 7) * torch.logspace(-1, 1, W.shape[1], dtype=F64)
    return W, X, r


@PROPS
@given(weight_calib_rank())
def test_whiten_beats_svd_on_output_error(case):
    W, X, r = case
    G = X.T @ X
    w = factorize(W, "whiten", {"rank": r}, stat=G, svd_dtype=F64)
    s = factorize(W, "svd", {"rank": r}, svd_dtype=F64)
    assert w.rank == s.rank == r
    assert _out_err(W, _product(w), X) <= _out_err(W, _product(s), X) * (1 + 1e-9) + 1e-10


@PROPS
@given(weight_calib_rank())
def test_whiten_output_error_is_dropped_spectrum_of_WL(case):
    W, X, r = case
    G = X.T @ X
    L, lam = safe_cholesky(G)
    assert lam == 0  # more tokens than channels: positive definite
    f = factorize(W, "whiten", {"rank": r}, stat=G, svd_dtype=F64)
    dropped = torch.linalg.svdvals(W @ L)[r:]
    expected = dropped.pow(2).sum().sqrt().item()
    assert _out_err(W, _product(f), X) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_whiten_unapply_inverts_whitening():
    W = _randn(7, 5, seed=1)
    X = _randn(40, 5, seed=2)
    G = X.T @ X
    pre = whiten(W, G)
    L = torch.linalg.cholesky(G)
    torch.testing.assert_close(pre.A, W @ L, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.unapply(pre.A), W, rtol=1e-10, atol=1e-12)
    # unapply is right-multiplication by L⁻¹ for any factor R
    R = _randn(3, 5, seed=3)
    torch.testing.assert_close(pre.unapply(R) @ L, R, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("tokens, n, r", [(4, 12, 3), (10, 16, 6), (2, 8, 1), (40, 10, 4)])
def test_whiten_rank_deficient_gram_gives_finite_factors(tokens, n, r, dead):
    W = _randn(10, n, seed=n)
    X = _randn(tokens, n, seed=tokens)
    if dead:
        X[:, 1] = 0
    G = X.T @ X
    L, lam = safe_cholesky(G)
    if tokens < n or dead:
        assert lam > 0
    w = factorize(W, "whiten", {"rank": r}, stat=G, svd_dtype=F64)
    assert torch.isfinite(w.U).all() and torch.isfinite(w.V).all()
    W_w = _product(w)
    # with damping, whitening truncates W L_λ where L_λ L_λᵀ = G + λ·scale·I: the error in that norm is
    # exactly the dropped spectrum of W L_λ
    damped_err = torch.linalg.matrix_norm((W - W_w) @ L).item()
    dropped = torch.linalg.svdvals(W @ L)[r:]
    assert damped_err == pytest.approx(dropped.pow(2).sum().sqrt().item(), rel=1e-7, abs=1e-9)
    # ‖(W − W′) L_λ‖² = out_err² + λ·scale·‖W − W′‖², and whitening minimises it, so against plain SVD:
    # out_err(whiten)² ≤ out_err(svd)² + λ·scale·‖W − W_svd‖², and ‖W − W_whiten‖² ≤ that bound / (λ·scale)
    s = factorize(W, "svd", {"rank": r}, svd_dtype=F64)
    scale = G.diagonal().mean().item()
    bound = _out_err(W, _product(s), X) ** 2 + lam * scale * torch.linalg.matrix_norm(W - _product(s)).item() ** 2
    assert damped_err**2 <= bound * (1 + 1e-8) + 1e-12
    assert _out_err(W, W_w, X) ** 2 <= bound * (1 + 1e-8) + 1e-12
    if lam > 0:  # the factors cannot blow up in directions the calibration data never visits
        assert torch.linalg.matrix_norm(W - W_w).item() ** 2 <= bound / (lam * scale) * (1 + 1e-6)
    if r >= tokens and not dead:
        # the calibration outputs live in a tokens-dimensional space: rank ≥ tokens reproduces them almost exactly
        assert _out_err(W, W_w, X) <= 1e-2 * torch.linalg.matrix_norm(W @ X.T).item()


def test_whiten_float32_svd_dtype_close_to_float64():
    W = _randn(16, 12, seed=5)
    X = _randn(60, 12, seed=6)
    G = X.T @ X
    f64 = factorize(W, "whiten", {"rank": 4}, stat=G, svd_dtype=F64)
    f32 = factorize(W.float(), "whiten", {"rank": 4}, stat=G)
    assert f32.U.dtype == torch.float32 and f32.V.dtype == torch.float32
    torch.testing.assert_close(_product(f32).double(), _product(f64), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- stat errors


@pytest.mark.parametrize(
    "method, stat, match",
    [
        ("whiten", torch.eye(5, dtype=F64), r"whiten statistic has shape \(5, 5\), expected \(6, 6\)"),
        ("whiten", torch.ones(6, dtype=F64), r"whiten statistic has shape \(6,\), expected \(6, 6\)"),
        ("whiten", torch.eye(4, dtype=F64), r"expected \(6, 6\)"),  # the output side, not the input side
        ("asvd", torch.ones(4, dtype=F64), r"asvd statistic has shape \(4,\), expected \(6,\)"),
        ("asvd", torch.ones(6, 6, dtype=F64), r"asvd statistic has shape \(6, 6\), expected \(6,\)"),
    ],
)
def test_wrong_stat_shape_raises(method, stat, match):
    W = _randn(4, 6)
    with pytest.raises(ValueError, match=match):
        get_method(method).fn(W, stat)
    with pytest.raises(ValueError, match=match):
        factorize(W, method, {"rank": 1}, stat=stat, svd_dtype=F64)


@pytest.mark.parametrize("method, match", [("whiten", r"whiten needs calibration statistics"), ("asvd", r"asvd needs calibration statistics")])
def test_methods_needing_stats_raise_without(method, match):
    W = _randn(4, 6)
    with pytest.raises(ValueError, match=match):
        get_method(method).fn(W, None)
    with pytest.raises(ValueError, match=match):
        factorize(W, method, {"rank": 1}, stat=None)


def test_non_finite_stat_raises():
    W = _randn(4, 6)
    G = torch.eye(6, dtype=F64)
    G[2, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        factorize(W, "whiten", {"rank": 1}, stat=G)
    absmean = torch.ones(6, dtype=F64)
    absmean[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        factorize(W, "asvd", {"rank": 1}, stat=absmean)
