"""``QuantLowRankLinear``: a low-rank layer whose factors are stored quantised (module type ``"quant_lowrank"``).

Each factor is a :class:`QuantFactor`: codes (int8, float8 e4m3, or int4 packed two per byte in uint8) and float32
scales (:mod:`rankcut.quant`). The state dict holds ``<layer>.V.codes``, ``<layer>.V.scale``, ``<layer>.U.codes``,
``<layer>.U.scale`` and ``<layer>.bias``. Codes and scales keep their dtypes through ``model.to(dtype)``,
``.half()`` and :func:`rankcut.save`'s ``dtype``: only the bias and the activations follow the model's dtype.

On CUDA the product runs through the dequantising Triton kernels (:mod:`rankcut.kernels.dispatch`) at decode
sizes; elsewhere (the CPU, prefill) the factors are dequantised to the input's dtype and multiplied eagerly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rankcut.modules.dense import dense_shape
from rankcut.modules.lowrank import LowRankLinear
from rankcut.modules.registry import register_module_type
from rankcut.quant import FORMATS, Quantized, check_group, dequantize, quantize

CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}


class QuantFactor(nn.Module):
    """One quantised matrix (out × in): ``codes`` and ``scale`` buffers, the format and the int4 group."""

    keeps_dtype = True  # rankcut.save(dtype=...) leaves these buffers as they are

    def __init__(self, out_features: int, in_features: int, fmt: str, group: int = 0,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown factor format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.out_features, self.in_features, self.format = out_features, in_features, fmt
        self.group = group if fmt == "int4" else 0
        if fmt == "int4":
            check_group(in_features, group, ragged=True)
            codes = (out_features, in_features // 2)
            scales = (out_features, -(-in_features // group))
        else:
            codes, scales = (out_features, in_features), (out_features,)
        self.register_buffer("codes", torch.empty(codes, dtype=CODE_DTYPES[fmt], device=device))
        self.register_buffer("scale", torch.empty(scales, dtype=torch.float32, device=device))

    @classmethod
    def from_quantized(cls, q: Quantized) -> QuantFactor:
        factor = cls(q.shape[0], q.shape[1], q.format, q.group, device=q.data.device)
        factor.codes, factor.scale = q.data.contiguous(), q.scale.to(torch.float32).contiguous()
        return factor

    def quantized(self) -> Quantized:
        return Quantized(self.codes, self.scale, self.format, (self.out_features, self.in_features), self.group)

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantised matrix (out × in) in ``dtype``."""
        return dequantize(self.quantized(), dtype)

    def nbytes(self) -> int:
        return self.quantized().nbytes()

    def _apply(self, fn, recurse: bool = True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for key, old in before.items():  # device moves apply; dtype casts do not
            new = self._buffers[key]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[key] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        return f"{self.out_features}x{self.in_features}, format={self.format}{group}"


@register_module_type
class QuantLowRankLinear(nn.Module):
    """``y = U(V(x)) + b`` with quantised factors ``V`` (rank × in) and ``U`` (out × rank).

    int4 groups run along each factor's input dimension: V's groups must divide ``in_features`` (an error
    otherwise); U's input dimension is the rank, so its last group may be shorter. An odd rank gets one zero
    component for int4 (two codes per byte), which changes nothing in the product.
    """

    record_type = "quant_lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, fmt: str, group: int = 128, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if fmt == "int4":
            check_group(in_features, group)
            if rank % 2:
                raise ValueError(f"int4 factors need an even rank, got {rank}")
        self.in_features, self.out_features, self.rank, self.format = in_features, out_features, rank, fmt
        self.group = group if fmt == "int4" else 0
        self.V = QuantFactor(rank, in_features, fmt, group, device)
        self.U = QuantFactor(out_features, rank, fmt, group, device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from rankcut.kernels.dispatch import quant_forward

            y = quant_forward(self, x)
            if y is not None:
                return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(F.linear(x, self.V.weight(x.dtype)), self.U.weight(x.dtype), bias)

    def trainable_children(self) -> tuple[str, ...]:
        """Quantised factors take no adapters (recovery runs on the float factors, before quantisation)."""
        return ()

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"format={self.format}{group}")

    def nbytes(self) -> int:
        """Bytes of the factors (codes and scales) and the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.V.nbytes() + self.U.nbytes() + bias

    def record_entry(self) -> dict:
        return {"rank": self.rank, "shape": [self.out_features, self.in_features], "format": self.format,
                "group": self.group, "scale_dtype": "float32"}

    @classmethod
    def from_record(cls, entry: dict, dense: nn.Module, device: torch.device | str = "meta") -> QuantLowRankLinear:
        out_f, in_f = dense_shape(dense)
        fmt = entry.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"quantised entry has format {fmt!r}; this rankcut knows {', '.join(FORMATS)}")
        shape = entry.get("shape")
        if shape is not None and list(shape) != [out_f, in_f]:
            raise ValueError(f"recorded shape {shape} does not match the layer ({out_f}, {in_f})")
        return cls(in_f, out_f, entry.get("rank"), fmt, entry.get("group") or 128,
                   bias=getattr(dense, "bias", None) is not None, device=device)

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None, fmt: str, group: int = 128,
                     gram: torch.Tensor | None = None, compensate: bool = True) -> QuantLowRankLinear:
        """Quantise factors ``U`` (out × r) and ``V`` (r × in): V first; then, with ``compensate``, U is refitted to
        the quantised V by least squares in the norm of ``gram`` (the layer's input Gram matrix ``XᵀX``; None:
        the Frobenius norm), :func:`rankcut.quant.refit_left`; then U is quantised.

        Raises:
            ValueError: shapes that do not chain, an unknown format, or (int4) a group that does not divide the
                input dimension.
        """
        from rankcut.quant import refit_left

        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"factor shapes do not chain: U {tuple(U.shape)}, V {tuple(V.shape)}")
        if fmt not in FORMATS:
            raise ValueError(f"unknown factor format {fmt!r}; choose one of {', '.join(FORMATS)}")
        out_f, in_f = U.shape[0], V.shape[1]
        if fmt == "int4":
            check_group(in_f, group)
            if U.shape[1] % 2:  # one zero component: the product is unchanged
                U, V = F.pad(U, (0, 1)), F.pad(V, (0, 0, 0, 1))
        U32, V32 = U.detach().to(torch.float32), V.detach().to(torch.float32)
        qV = quantize(V32, fmt, group)
        if compensate:
            U32 = refit_left(U32, V32, dequantize(qV), gram)
        qU = quantize(U32, fmt, group, ragged=True)
        layer = cls(in_f, out_f, U.shape[1], fmt, group, bias=bias is not None, device=U.device,
                    dtype=bias.dtype if bias is not None else U.dtype)
        layer.V, layer.U = QuantFactor.from_quantized(qV), QuantFactor.from_quantized(qU)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_lowrank(cls, layer: LowRankLinear, fmt: str, group: int = 128, gram: torch.Tensor | None = None,
                     compensate: bool = True) -> QuantLowRankLinear:
        """Quantise a :class:`LowRankLinear` (see :meth:`from_factors`); the bias keeps the layer's dtype."""
        return cls.from_factors(layer.U.weight, layer.V.weight, layer.U.bias, fmt, group, gram, compensate)

    def dequantized(self, dtype: torch.dtype | None = None) -> LowRankLinear:
        """The same product as a float :class:`LowRankLinear` (dequantised factors, in ``dtype``: default the
        bias's dtype, else float32)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return LowRankLinear.from_factors(self.U.weight(dtype), self.V.weight(dtype), self.bias, dtype=dtype)
