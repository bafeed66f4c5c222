"""Golub–Kahan–Lanczos bidiagonalisation against the exact SVD, and as a weight-decomposition solver."""

from __future__ import annotations

import pytest
import torch

from rankcut.lanczos import lanczos_svd
from rankcut.linalg import svd_top

pytestmark = pytest.mark.usefixtures("one_thread")


def known(m: int, n: int, values, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(values), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(values), generator=gen, dtype=torch.float64))
    return (U @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ V.T).to(dtype)


SPECTRA = {
    "geometric": [0.9 ** i for i in range(60)],
    "clustered": [1.0] * 5 + [0.999] * 5 + [0.5 ** i for i in range(40)],
    "rank-deficient": [3.0, 2.0, 1.0],
    "flat then gap": [1.0] * 8 + [1e-3] * 30,
}


def _subspace_gap(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖P_A − P_B‖ for orthonormal bases (columns)."""
    return float(torch.linalg.matrix_norm(A @ A.mT - B @ B.mT, ord=2))


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_top_values_and_subspaces_match_the_exact_svd(name, reorth):
    A = known(200, 120, SPECTRA[name])
    k = 5
    U, S, Vh = lanczos_svd(A, k, reorth=reorth)
    u, s, vh = torch.linalg.svd(A, full_matrices=False)
    assert torch.allclose(S, s[:k], atol=1e-10)
    assert torch.allclose(U.mT @ U, torch.eye(k, dtype=A.dtype), atol=1e-8)
    # subspaces are defined where the spectrum has a gap after k
    if float(s[k - 1] - s[k]) > 1e-6:
        assert _subspace_gap(U, u[:, :k]) < 1e-6 and _subspace_gap(Vh.mT, vh[:k].mT) < 1e-6
    # rank-k reconstruction error is the Eckart–Young optimum
    err = torch.linalg.matrix_norm(A - (U * S) @ Vh)
    assert float(err) == pytest.approx(float(s[k:].pow(2).sum().sqrt()), abs=1e-8)


def test_without_reorthogonalisation_spurious_copies_appear():
    """The reason reorthogonalisation exists: plain Lanczos loses orthogonality on a clustered spectrum."""
    A = known(200, 120, SPECTRA["geometric"])
    U, S, Vh = lanczos_svd(A, 5, reorth="none")
    assert float((S - torch.linalg.svdvals(A)[:5]).abs().max()) > 1e-2  # wrong values from a non-orthogonal basis


def test_batched_on_float32_matches_each_matrix():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(4, 96, 64, generator=gen)
    U, S, Vh, info = lanczos_svd(A, 8, return_info=True)
    assert U.shape == (4, 96, 8) and S.shape == (4, 8) and Vh.shape == (4, 8, 64) and S.dtype == torch.float32
    exact = torch.linalg.svdvals(A.double())[:, :8]
    assert torch.allclose(S.double(), exact, rtol=1e-3)
    assert info["converged"] and info["steps"] <= 64
    for i in range(4):
        Ui, Si, _ = lanczos_svd(A[i], 8)
        assert torch.allclose(Si, S[i], rtol=1e-4)


def test_stopping_rule_holds_the_residuals():
    A = known(300, 200, [0.8 ** i for i in range(150)])
    U, S, Vh, info = lanczos_svd(A, 4, tol=1e-9, return_info=True)
    assert info["converged"] and info["steps"] < 200
    res = torch.linalg.vector_norm(A.mT @ U - Vh.mT * S, dim=0)
    assert float(res.max()) <= 1e-8 * float(S[0])


def test_full_rank_is_exact_and_bad_input_is_refused():
    A = known(30, 20, [1.0 / (i + 1) for i in range(20)])
    U, S, Vh = lanczos_svd(A, 20)
    assert torch.allclose((U * S) @ Vh, A, atol=1e-10)
    with pytest.raises(ValueError, match="rank 21 must be an integer in 1..20"):
        lanczos_svd(A, 21)
    with pytest.raises(ValueError, match="reorth must be one of"):
        lanczos_svd(A, 2, reorth="sometimes")
    with pytest.raises(ValueError, match="floating-point matrix"):
        lanczos_svd(torch.ones(3, 3, 3, 3), 1)


def test_lanczos_is_a_weight_solver():
    A = known(64, 48, [0.7 ** i for i in range(40)], dtype=torch.float32)
    U, S, Vh = svd_top(A, 6, solver="lanczos")
    assert torch.allclose(S, torch.linalg.svdvals(A)[:6], rtol=1e-4)
    import rankcut

    cfg = rankcut.CompressConfig(method="svd", keep=0.5, options={"solver": "lanczos"})
    assert cfg.options.solver == "lanczos"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_lanczos_on_cuda_matches_the_exact_svd():
    gen = torch.Generator(device="cuda").manual_seed(0)
    A = torch.randn(8, 1024, 4096, device="cuda", generator=gen)
    U, S, Vh = lanczos_svd(A, 20)
    exact = torch.linalg.svdvals(A.double())[:, :20]
    assert torch.allclose(S.double(), exact, rtol=1e-3)
    assert U.device.type == "cuda" and torch.allclose(U.mT @ U, torch.eye(20, device="cuda").expand(8, 20, 20), atol=1e-4)
