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

from rankcut.modules import LowRankLinear


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
        return F.linear(x, self.W_cat, self.bias_cat)


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
    return SeparateGroup(layers)
