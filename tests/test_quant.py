"""Quantised factors (issue 14, first part): formats, packing, error bounds, compensation."""

from __future__ import annotations

import pytest
import torch

from rankcut.quant import dequantize, quantize, refit_left


def _W(m=48, n=256, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt,rel", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_integer_formats_are_within_half_a_step(fmt, rel):
    W = _W()
    q = quantize(W, fmt)
    err = (dequantize(q) - W).abs()
    if fmt == "int8":
        step = W.abs().amax(1, keepdim=True) / 127
    else:
        step = (W.abs().view(48, 2, 128).amax(-1) / 7).repeat_interleave(128, 1)
    assert bool((err <= step / 2 + 1e-6).all())
    assert q.data.dtype == (torch.int8 if fmt == "int8" else torch.uint8)


def test_int4_packs_two_codes_per_byte_and_roundtrips_exact_grid_values():
    codes = torch.randint(-7, 8, (4, 256), generator=torch.Generator().manual_seed(1)).float()
    codes[:, 0] = 7  # each group's absmax is 7: the scale is exactly 1
    codes[:, 128] = -7
    q = quantize(codes, "int4")
    assert q.data.shape == (4, 128) and q.nbytes() == 4 * 128 + 4 * 2 * 4
    assert torch.equal(dequantize(q), codes)


def test_fp8_uses_e4m3_with_per_channel_scales():
    W = _W()
    q = quantize(W, "fp8")
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (48,)
    rel = ((dequantize(q) - W).norm() / W.norm()).item()
    assert rel < 0.05  # 3 mantissa bits: about 2-3 % relative error


def test_compensation_lowers_the_whitened_error():
    gen = torch.Generator().manual_seed(2)
    U, V = torch.randn(64, 16, generator=gen), torch.randn(16, 96, generator=gen)
    X = torch.randn(500, 96, generator=gen) * torch.linspace(0.1, 3, 96)
    G = X.T @ X
    L = torch.linalg.cholesky(G.double())
    for fmt in ("int8", "int4"):
        group = 32 if fmt == "int4" else 128
        Vq = dequantize(quantize(V, fmt, group))
        naive = dequantize(quantize(U, fmt, 16 if fmt == "int4" else 128))
        refit = dequantize(quantize(refit_left(U, V, Vq, G), fmt, 16 if fmt == "int4" else 128))

        def err(Uq):
            return ((U @ V - Uq @ Vq).double() @ L).norm().item()

        assert err(refit) < err(naive)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="int4 group size 100 does not divide the input dimension 256"):
        quantize(_W(), "int4", group=100)
    with pytest.raises(ValueError, match="group size must be an even integer >= 2, got 33"):
        quantize(_W(), "int4", group=33, ragged=True)
    with pytest.raises(ValueError, match="the input dimension 255 must be even"):
        quantize(_W(n=255), "int4", group=128, ragged=True)
    with pytest.raises(ValueError, match="unknown factor format 'int2'"):
        quantize(_W(), "int2")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[float("nan"), 1.0]]), "int8")
