"""Weight quantisation of factors (issue 14, first part): int8 and fp8 e4m3 with per-output-channel scales, int4
group-wise with two values per byte. Pure math; the module type and kernels build on it.

Every format is symmetric: ``W ≈ scale · q``. Scales are float32, one per output row (int8, fp8) or per row and
group of ``group`` input columns (int4). The int8 range is ±127, int4 ±7 (the codes −8 is never used, so the
grid is symmetric), fp8 e4m3 ±448 (its largest finite value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int8", "fp8", "int4")
_LIMIT = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}


@dataclass
class Quantized:
    """``data`` (int8 / float8_e4m3fn / uint8 with two int4 codes per byte), ``scale`` (float32), the format,
    the original (out, in) shape and the int4 group size."""

    data: torch.Tensor
    scale: torch.Tensor
    format: str
    shape: tuple[int, int]
    group: int = 0

    def nbytes(self) -> int:
        """Bytes stored: codes plus scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def _scales(absmax: torch.Tensor, fmt: str) -> torch.Tensor:
    return (absmax / _LIMIT[fmt]).clamp_min(torch.finfo(torch.float32).tiny)


def quantize(W: torch.Tensor, fmt: str, group: int = 128, ragged: bool = False) -> Quantized:
    """Quantise a matrix (out × in).

    ``ragged`` (int4): the last group of each row may be shorter than ``group`` (scales ``ceil(in / group)`` per
    row); used for a factor whose input dimension is a rank, which the allocation chooses. The input dimension
    must still be even (two codes per byte).

    Raises:
        ValueError: an unknown format, a non-matrix, non-finite values, or (int4) a group size that does not
            divide the input dimension (unless ``ragged``), an odd group or an odd input dimension.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown factor format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if W.ndim != 2 or not W.is_floating_point():
        raise ValueError(f"quantize needs a floating-point matrix, got shape {tuple(W.shape)} of {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError("cannot quantise non-finite values")
    m, n = W.shape
    X = W.detach().to(torch.float32)
    if fmt == "int4":
        check_group(n, group, ragged)
        pad = (-n) % group
        G = torch.nn.functional.pad(X, (0, pad)).view(m, (n + pad) // group, group)
        scale = _scales(G.abs().amax(-1), fmt)  # m × groups
        codes = torch.round(G / scale[..., None]).clamp(-7, 7).to(torch.int8).view(m, n + pad)[:, :n]
        packed = ((codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)).to(torch.uint8)
        return Quantized(packed, scale, fmt, (m, n), group)
    scale = _scales(X.abs().amax(1), fmt)  # m
    scaled = X / scale[:, None]
    if fmt == "int8":
        data = torch.round(scaled).clamp(-127, 127).to(torch.int8)
    else:
        data = scaled.clamp(-448, 448).to(torch.float8_e4m3fn)
    return Quantized(data, scale, fmt, (m, n))


def check_group(n: int, group: int, ragged: bool = False) -> None:
    """Raise ValueError unless int4 groups of ``group`` fit an input dimension ``n``."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2:
        raise ValueError(f"int4 group size must be an even integer >= 2, got {group!r}")
    if n % 2:
        raise ValueError(f"int4 packs two codes per byte: the input dimension {n} must be even")
    if not ragged and n % group:
        raise ValueError(f"int4 group size {group} does not divide the input dimension {n}")


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The matrix ``scale · codes`` in ``dtype``."""
    m, n = q.shape
    if q.format == "int4":
        low = (q.data & 0x0F).to(torch.int8)
        high = (q.data >> 4).to(torch.int8)
        low = torch.where(low > 7, low - 16, low)
        high = torch.where(high > 7, high - 16, high)
        codes = torch.stack([low, high], -1).view(m, n).to(torch.float32)
        pad = (-n) % q.group
        codes = torch.nn.functional.pad(codes, (0, pad)).view(m, (n + pad) // q.group, q.group)
        return (codes * q.scale[..., None]).view(m, n + pad)[:, :n].to(dtype)
    return (q.data.to(torch.float32) * q.scale[:, None]).to(dtype)


def refit_left(U: torch.Tensor, V: torch.Tensor, Vq: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Error compensation after quantising V: the ``U'`` minimising ``‖(U V − U' Vq) L‖_F`` (``L Lᵀ = gram``, the
    method's input statistic; None: the identity), ``U' = U V G Vqᵀ (Vq G Vqᵀ)⁻¹`` — then U' is quantised in its
    turn. In float64; returns ``U``'s dtype."""
    U64, V64, Q64 = U.to(torch.float64), V.to(torch.float64), Vq.to(torch.float64)
    G = torch.eye(V.shape[1], dtype=torch.float64, device=V.device) if gram is None else gram.to(torch.float64)
    A = Q64 @ G @ Q64.mT
    B = U64 @ (V64 @ G @ Q64.mT)
    ridge = 1e-10 * torch.diagonal(A).mean().clamp_min(1e-300)
    return torch.linalg.solve(A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=A.device), B.mT).mT.to(U.dtype)
