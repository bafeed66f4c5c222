"""Horizontal fusion: layers that read the same input (q/k/v, gate/up) computed as one product.

:class:`LowRankGroup` stacks the ``V`` factors of several :class:`~rankcut.modules.LowRankLinear` (any ranks)
into one (R, K) matrix and their ``U`` factors into one flat buffer, so that on CUDA one kernel launch
computes all their outputs, concatenated. :class:`DenseGroup` does the same for ``nn.Linear`` layers with
one concatenated weight (one cuBLAS call). Fusion is an inference-time transformation, never part of a
checkpoint: by default (``share=True``) the layers' own parameters are re-pointed at views of the fused
buffers, so no memory is duplicated and the state-dict keys, shapes and values stay the same; call
:meth:`unshare` before training or saving with safetensors (which refuses tensors sharing memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rankcut.modules import LowRankLinear, QuantLowRankLinear


def _rebind(param: nn.Parameter, view: torch.Tensor) -> None:
    param.data = view


class LowRankGroup(nn.Module):
    """Several low-rank layers sharing an input: ``forward(x)`` returns their outputs concatenated.

    Args:
        layers: :class:`LowRankLinear` layers with the same ``in_features``, dtype and device.
        share: re-point the layers' parameters at the fused buffers (no copy kept).
    """

    def __init__(self, layers: Sequence[LowRankLinear], share: bool = True, force: bool = False) -> None:
        super().__init__()
        self.force = force  # use the kernel whenever eligible, even where cuBLAS measured faster (tests)
        if not layers or any(not isinstance(l, LowRankLinear) for l in layers):
            raise TypeError("LowRankGroup needs one or more LowRankLinear layers")
        if len({l.in_features for l in layers}) != 1:
            raise ValueError(f"layers of a group must share in_features, got {[l.in_features for l in layers]}")
        self.layers = list(layers)
        self.ranks = [l.rank for l in layers]
        self.ns = [l.out_features for l in layers]
        with torch.no_grad():
            V = torch.cat([l.V.weight.detach() for l in layers]).contiguous()
            U = torch.cat([l.U.weight.detach().reshape(-1) for l in layers]).contiguous()
            has_bias = any(l.U.bias is not None for l in layers)
            ref = layers[0].U.weight
            bias = None
            if has_bias:
                bias = torch.cat([l.U.bias.detach() if l.U.bias is not None else ref.new_zeros(l.out_features)
                                  for l in layers]).contiguous()
        self.register_buffer("V_cat", V, persistent=False)
        self.register_buffer("U_flat", U, persistent=False)
        self.register_buffer("bias_cat", bias, persistent=False)
        if share:
            self._share()

    def _share(self) -> None:
        r0 = u0 = n0 = 0
        for layer, r, n in zip(self.layers, self.ranks, self.ns):
            _rebind(layer.V.weight, self.V_cat[r0:r0 + r])
            _rebind(layer.U.weight, self.U_flat[u0:u0 + n * r].view(n, r))
            if layer.U.bias is not None:
                _rebind(layer.U.bias, self.bias_cat[n0:n0 + n])
            r0, u0, n0 = r0 + r, u0 + n * r, n0 + n

    def unshare(self) -> None:
        """Give every layer its own contiguous copy of its parameters again (the group keeps its buffers)."""
        for layer in self.layers:
            for p in (layer.V.weight, layer.U.weight, layer.U.bias):
                if p is not None:
                    _rebind(p, p.data.clone())

    def segments(self) -> list[slice]:
        """The slice of the concatenated output that belongs to each layer."""
        out, start = [], 0
        for n in self.ns:
            out.append(slice(start, start + n))
            start += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rankcut.kernels.dispatch import eligible, run_kernel
        from rankcut.kernels.plan import kernel_pays

        k = x.shape[-1]
        rows = x.numel() // k
        if eligible(x, [self.V_cat, self.U_flat, self.bias_cat], rows) and (self.force or kernel_pays(rows, self.ranks)):
            return run_kernel(x, self.V_cat, self.U_flat, self.bias_cat, self.ranks, self.ns, self)
        t = F.linear(x, self.V_cat)
        outs, r0, u0 = [], 0, 0
        for (r, n), seg in zip(zip(self.ranks, self.ns), self.segments()):
            b = None if self.bias_cat is None else self.bias_cat[seg]
            outs.append(F.linear(t[..., r0:r0 + r], self.U_flat[u0:u0 + n * r].view(n, r), b))
            r0, u0 = r0 + r, u0 + n * r
        return torch.cat(outs, dim=-1)


class DenseGroup(nn.Module):
    """Several ``nn.Linear`` layers sharing an input, as one concatenated weight (one GEMM/GEMV)."""

    def __init__(self, layers: Sequence[nn.Linear], share: bool = True) -> None:
        super().__init__()
        if not layers or any(type(l) is not nn.Linear for l in layers):
            raise TypeError("DenseGroup needs one or more nn.Linear layers")
        self.layers = list(layers)
        self.ns = [l.out_features for l in layers]
        with torch.no_grad():
            W = torch.cat([l.weight.detach() for l in layers]).contiguous()
            has_bias = any(l.bias is not None for l in layers)
            bias = torch.cat([l.bias.detach() if l.bias is not None else l.weight.new_zeros(l.out_features)
                              for l in layers]) if has_bias else None
        self.register_buffer("W_cat", W, persistent=False)
        self.register_buffer("bias_cat", bias, persistent=False)
        if share:
            n0 = 0
            for layer, n in zip(self.layers, self.ns):
                _rebind(layer.weight, self.W_cat[n0:n0 + n])
                if layer.bias is not None:
                    _rebind(layer.bias, self.bias_cat[n0:n0 + n])
                n0 += n

    def unshare(self) -> None:
        for layer in self.layers:
            for p in (layer.weight, layer.bias):
                if p is not None:
                    _rebind(p, p.data.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one token: the dense GEMV where it applies (rankcut.kernels.dispatch.dense_forward)
            from rankcut.kernels.dispatch import dense_forward

            y = dense_forward(self.W_cat, self.bias_cat, x)
            if y is not None:
                return y
        return F.linear(x, self.W_cat, self.bias_cat)


class QuantLowRankGroup(nn.Module):
    """Several :class:`~rankcut.modules.QuantLowRankLinear` layers of one format sharing an input (at most four,
    what the quantised kernels address): codes and scales stacked like :class:`LowRankGroup`'s factors, one
    pair of kernel launches on CUDA; elsewhere each layer dequantises and runs on its own."""

    def __init__(self, layers: Sequence[QuantLowRankLinear], share: bool = True) -> None:
        super().__init__()
        if not layers or any(not isinstance(l, QuantLowRankLinear) for l in layers):
            raise TypeError("QuantLowRankGroup needs one or more QuantLowRankLinear layers")
        if len(layers) > 4:
            raise ValueError(f"the quantised kernels fuse at most four layers, got {len(layers)}")
        if len({(l.in_features, l.format, l.group) for l in layers}) != 1:
            raise ValueError("layers of a quantised group must share in_features, format and group")
        self.layers = list(layers)
        self.ranks = [l.rank for l in layers]
        self.ns = [l.out_features for l in layers]
        self.group = layers[0].group
        with torch.no_grad():
            self.register_buffer("V_codes", torch.cat([l.V.codes for l in layers]).contiguous(), persistent=False)
            self.register_buffer("V_scale", torch.cat([l.V.scale for l in layers]).contiguous(), persistent=False)
            self.register_buffer("U_codes", torch.cat([l.U.codes.reshape(-1) for l in layers]).contiguous(),
                                 persistent=False)
            self.register_buffer("U_scale", torch.cat([l.U.scale.reshape(-1) for l in layers]).contiguous(),
                                 persistent=False)
            bias = None
            if any(l.bias is not None for l in layers):
                ref = next(l.bias for l in layers if l.bias is not None)
                bias = torch.cat([l.bias.detach() if l.bias is not None else ref.new_zeros(l.out_features)
                                  for l in layers]).contiguous()
            self.register_buffer("bias_cat", bias, persistent=False)
        sizes = [l.U.scale.numel() for l in layers]
        self.scale_offsets = tuple(sum(sizes[: i + 1]) for i in range(3))
        if share:
            self._share()

    def _share(self) -> None:
        v0 = u0 = s0 = n0 = 0
        for layer in self.layers:
            V, U = layer.V, layer.U
            r, cu, su = V.codes.shape[0], U.codes.numel(), U.scale.numel()
            V._buffers["codes"], V._buffers["scale"] = self.V_codes[v0:v0 + r], self.V_scale[v0:v0 + r]
            U._buffers["codes"] = self.U_codes[u0:u0 + cu].view(U.codes.shape)
            U._buffers["scale"] = self.U_scale[s0:s0 + su].view(U.scale.shape)
            if layer.bias is not None:
                _rebind(layer.bias, self.bias_cat[n0:n0 + layer.out_features])
            v0, u0, s0, n0 = v0 + r, u0 + cu, s0 + su, n0 + layer.out_features

    def unshare(self) -> None:
        for layer in self.layers:
            for factor in (layer.V, layer.U):
                for key in ("codes", "scale"):
                    factor._buffers[key] = factor._buffers[key].clone()
            if layer.bias is not None:
                _rebind(layer.bias, layer.bias.data.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rankcut.kernels.dispatch import kernel_group, quant_eligible, run_quant_kernel

        k = x.shape[-1]
        rows = x.numel() // k
        if (not self.group or kernel_group(self.group)) and quant_eligible(x, [self.V_codes, self.U_codes,
                                                                               self.bias_cat], rows):
            return run_quant_kernel(x, self.V_codes, self.V_scale, self.U_codes, self.U_scale, self.bias_cat,
                                    self.ranks, self.ns, self.group, self, self.scale_offsets)
        return torch.cat([QuantLowRankLinear.forward(layer, x) for layer in self.layers], dim=-1)


class SeparateGroup(nn.Module):
    """Fallback for layers that cannot be fused (mixed kinds): call each, concatenate."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = list(layers)

    def unshare(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def make_group(layers: Sequence[nn.Module], share: bool = True) -> nn.Module:
    """The fastest exact grouping available for ``layers``: low-rank, dense, or separate calls."""
    if all(isinstance(l, LowRankLinear) and type(l.V) is nn.Linear and type(l.U) is nn.Linear for l in layers):
        return LowRankGroup(layers, share=share)
    if all(type(l) is nn.Linear for l in layers):
        return DenseGroup(layers, share=share)
    if (all(isinstance(l, QuantLowRankLinear) for l in layers) and len(layers) <= 4
            and len({(l.in_features, l.format, l.group) for l in layers}) == 1):
        return QuantLowRankGroup(layers, share=share)
    return SeparateGroup(layers)
