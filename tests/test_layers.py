"""LowRankLinear: exact full-rank factorisation, truncation error, dtype/device, shapes, state_dict layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rankcut.modules import LowRankLinear, dense_shape, dense_weight

# (in, out): tall (out > in), wide (out < in), square
SHAPES = [(5, 11), (13, 4), (7, 7)]


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def _inputs(n_in: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 6, n_in, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_in, n_out", SHAPES)
def test_full_rank_reproduces_linear_exactly(n_in, n_out, bias, dtype):
    dense = _linear(n_in, n_out, bias, dtype)
    low = LowRankLinear.from_dense(dense)
    assert low.rank == min(n_in, n_out)
    x = _inputs(n_in, dtype)
    with torch.no_grad():
        assert torch.equal(low(x), dense(x))
        # asking for more than full rank is the same exact factorisation
        assert torch.equal(LowRankLinear.from_dense(dense, rank=n_in + n_out)(x), dense(x))
    # the product of the factors is W itself, bit for bit
    assert torch.equal(low.U.weight @ low.V.weight, dense.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_in, n_out", SHAPES)
def test_full_rank_reproduces_conv1d_exactly(n_in, n_out, dtype):
    torch.manual_seed(3)
    conv = Conv1D(n_out, n_in).to(dtype)  # GPT-2 layout: weight is (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    assert conv.weight.shape == (n_in, n_out)
    assert dense_shape(conv) == (n_out, n_in)
    assert torch.equal(dense_weight(conv), conv.weight.t())
    low = LowRankLinear.from_dense(conv)
    assert (low.in_features, low.out_features, low.rank) == (n_in, n_out, min(n_in, n_out))
    # the factors hold W (out, in) and an identity, bit for bit
    assert torch.equal(low.U.weight @ low.V.weight, conv.weight.detach().t())
    assert torch.equal(low.U.bias, conv.bias)
    x = _inputs(n_in, dtype)
    # an nn.Linear holding the same (out, in) weight: the low-rank layer computes exactly what it computes
    as_linear = nn.Linear(n_in, n_out, dtype=dtype)
    with torch.no_grad():
        as_linear.weight.copy_(conv.weight.t())
        as_linear.bias.copy_(conv.bias)
        y_low, y_conv = low(x), conv(x)
        assert torch.equal(y_low, as_linear(x))
        # Conv1D multiplies by the (in, out) storage directly; BLAS may sum in another order for the transposed
        # layout, so agreement with Conv1D itself is to rounding: within a few ulps of sum |x_j w_jk| + |b_k|.
        scale = x.abs() @ conv.weight.abs() + conv.bias.abs()
        eps = torch.finfo(dtype).eps
        assert ((y_low - y_conv).abs() <= 4 * n_in * eps * scale).all()


def test_dense_weight_rejects_other_modules():
    with pytest.raises(TypeError, match="already decomposed"):
        dense_weight(LowRankLinear(4, 3, 2))
    with pytest.raises(TypeError, match="expected nn.Linear or Conv1D, got Conv2d"):
        dense_weight(nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_in, n_out", SHAPES)
def test_to_dense_round_trip(n_in, n_out, dtype):
    dense = _linear(n_in, n_out, True, dtype)
    back = LowRankLinear.from_dense(dense).to_dense()
    assert isinstance(back, nn.Linear)
    assert back.weight.dtype == dtype
    assert torch.equal(back.weight, dense.weight)
    assert torch.equal(back.bias, dense.bias)
    x = _inputs(n_in, dtype)
    with torch.no_grad():
        assert torch.equal(back(x), dense(x))


def test_to_dense_of_truncated_layer_is_product_of_factors():
    dense = _linear(9, 6, True, torch.float64)
    low = LowRankLinear.from_dense(dense, rank=2)
    back = low.to_dense()
    torch.testing.assert_close(back.weight, low.U.weight @ low.V.weight, rtol=0, atol=0)
    assert torch.linalg.matrix_rank(back.weight).item() == 2
    x = _inputs(9, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), low(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_in, n_out", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_truncated_error_is_eckart_young(n_in, n_out, rank):
    dense = _linear(n_in, n_out, False, torch.float64, seed=rank)
    W = dense.weight.detach()
    S = torch.linalg.svdvals(W)
    low = LowRankLinear.from_dense(dense, rank=rank)
    assert low.rank == rank
    assert low.U.weight.shape == (n_out, rank) and low.V.weight.shape == (rank, n_in)
    err = torch.linalg.matrix_norm(W - low.U.weight @ low.V.weight).item()
    expected = S[rank:].pow(2).sum().sqrt().item()
    assert err == pytest.approx(expected, rel=1e-10)
    # and the product has exactly the top singular values of W
    torch.testing.assert_close(torch.linalg.svdvals(low.to_dense().weight)[:rank], S[:rank], rtol=1e-10, atol=0)


def test_truncated_error_float32_close_to_eckart_young():
    dense = _linear(24, 16, True, torch.float32, seed=5)
    W = dense.weight.detach().double()
    low = LowRankLinear.from_dense(dense, rank=6)
    err = torch.linalg.matrix_norm(W - (low.U.weight @ low.V.weight).double()).item()
    expected = torch.linalg.svdvals(W)[6:].pow(2).sum().sqrt().item()
    assert err == pytest.approx(expected, rel=1e-4)
    assert torch.equal(low.U.bias, dense.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
@pytest.mark.parametrize("rank", [None, 3])
def test_dtype_and_device_preserved(dtype, rank):
    dense = _linear(10, 8, True, torch.float32).to(dtype)
    low = LowRankLinear.from_dense(dense, rank=rank)
    for p in low.parameters():
        assert p.dtype == dtype
        assert p.device == dense.weight.device
    assert low.to_dense().weight.dtype == dtype
    x = _inputs(10, dtype)
    with torch.no_grad():
        y = low(x)
    assert y.dtype == dtype
    if rank is None:
        # full rank is exact in any dtype: the identity factor changes nothing
        assert torch.equal(low.U.weight @ low.V.weight, dense.weight.detach())


def test_meta_device_preserved():
    dense = nn.Linear(6, 4, device="meta")
    low = LowRankLinear.from_dense(dense)
    assert all(p.device.type == "meta" for p in low.parameters())
    assert dense_shape(dense) == (4, 6)


def test_from_factors_values_and_dtype():
    U = torch.arange(6.0).reshape(3, 2)
    V = torch.arange(8.0).reshape(2, 4)
    b = torch.tensor([1.0, -1.0, 0.5])
    low = LowRankLinear.from_factors(U, V, b)
    assert (low.in_features, low.out_features, low.rank) == (4, 3, 2)
    assert torch.equal(low.U.weight, U) and torch.equal(low.V.weight, V) and torch.equal(low.U.bias, b)
    x = torch.randn(5, 4)
    torch.testing.assert_close(low(x), x @ (U @ V).T + b)
    half = LowRankLinear.from_factors(U, V, dtype=torch.float16)
    assert half.U.weight.dtype == torch.float16 and half.U.bias is None and half.bias is None


@pytest.mark.parametrize(
    "U, V, bias, match",
    [
        (torch.zeros(3, 2), torch.zeros(3, 4), None, r"do not chain: U \(3, 2\), V \(3, 4\)"),
        (torch.zeros(3), torch.zeros(1, 4), None, r"do not chain"),
        (torch.zeros(3, 2), torch.zeros(2, 4, 1), None, r"do not chain"),
        (torch.zeros(3, 2), torch.zeros(2, 4), torch.zeros(4), r"bias shape \(4,\) does not match out_features 3"),
        (torch.zeros(3, 2), torch.zeros(2, 4), torch.zeros(3, 1), r"bias shape"),
    ],
)
def test_from_factors_shape_errors(U, V, bias, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear.from_factors(U, V, bias)


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_below_one_rejected(rank):
    with pytest.raises(ValueError, match=rf"rank must be >= 1, got {rank}"):
        LowRankLinear(4, 3, rank)
    with pytest.raises(ValueError, match=rf"rank must be >= 1, got {rank}"):
        LowRankLinear.from_dense(nn.Linear(4, 3), rank=rank)


@pytest.mark.parametrize("n_in, n_out, rank", [(10, 6, 2), (6, 10, 4), (32, 32, 1), (1, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count(n_in, n_out, rank, bias):
    low = LowRankLinear(n_in, n_out, rank, bias=bias)
    count = sum(p.numel() for p in low.parameters())
    assert count == rank * (n_in + n_out) + (n_out if bias else 0)


def test_state_dict_layout():
    low = LowRankLinear.from_dense(_linear(7, 5, True, torch.float32), rank=3)
    sd = low.state_dict()
    assert set(sd) == {"U.weight", "V.weight", "U.bias"}
    assert sd["U.weight"].shape == (5, 3)
    assert sd["V.weight"].shape == (3, 7)
    assert sd["U.bias"].shape == (5,)
    assert type(low.U) is nn.Linear and type(low.V) is nn.Linear
    assert {name for name, _ in low.named_children()} == {"U", "V"}
    assert not any("lora" in k for k in sd)

    no_bias = LowRankLinear.from_dense(_linear(7, 5, False, torch.float32), rank=3)
    assert set(no_bias.state_dict()) == {"U.weight", "V.weight"}


def test_state_dict_loads_into_skeleton():
    src = LowRankLinear.from_dense(_linear(7, 5, True, torch.float32), rank=3)
    dst = LowRankLinear(7, 5, 3)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 7)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_forward_is_composition_of_children():
    low = LowRankLinear.from_dense(_linear(8, 6, True, torch.float64), rank=2)
    x = _inputs(8, torch.float64)
    with torch.no_grad():
        expected = x @ low.V.weight.T @ low.U.weight.T + low.U.bias
        torch.testing.assert_close(low(x), expected, rtol=1e-12, atol=1e-12)
    assert low.rank == 2
