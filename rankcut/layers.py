"""The one module rankcut swaps into a model: a linear layer stored as two factors."""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 family stores its projections as Conv1D with weight (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` as an (out, in) matrix (a view, not a copy)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.t()
    if isinstance(layer, LowRankLinear):
        raise TypeError("layer is already low-rank; use LowRankLinear.to_dense() for its product")
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def low_rank_modules(model: nn.Module) -> dict[str, "LowRankLinear"]:
    """Every :class:`LowRankLinear` of ``model`` by qualified name, in module order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}


def dense_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a dense linear layer, without materialising anything (works on the meta device)."""
    weight = dense_weight(layer)
    return int(weight.shape[0]), int(weight.shape[1])


class LowRankLinear(nn.Module):
    """``y = U(V(x)) = (x Vᵀ) Uᵀ + b`` with ``V``: in→rank and ``U``: rank→out, both ``nn.Linear``.

    The bias lives on ``U``. Keeping the factors as plain ``nn.Linear`` children lets PEFT wrap each one and
    merge back without changing the rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.U = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # decode-sized inference on CUDA: Triton kernels where they measured faster (kernels.dispatch)
            from rankcut.kernels.dispatch import lowrank_forward

            y = lowrank_forward(self, x)
            if y is not None:
                return y
        return self.U(self.V(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.U.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    @classmethod
    def from_factors(
        cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> LowRankLinear:
        """Build from factors ``U`` (out×r) and ``V`` (r×in); stored in ``dtype`` (default: ``U``'s)."""
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(f"factor shapes do not chain: U {tuple(U.shape)}, V {tuple(V.shape)}")
        if bias is not None and bias.shape != (U.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features {U.shape[0]}")
        dtype = dtype or U.dtype
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, device=U.device, dtype=dtype)
        with torch.no_grad():
            layer.U.weight.copy_(U)
            layer.V.weight.copy_(V)
            if bias is not None:
                layer.U.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: int | None = None) -> LowRankLinear:
        """Factorise a dense ``nn.Linear``/``Conv1D`` by truncated SVD, keeping its dtype and device.

        At full rank (``rank`` None or >= min(out, in)) the factorisation is exact: the shorter side is an
        identity factor, so the result computes exactly what an ``nn.Linear`` with the same weight computes
        (a GPT-2 ``Conv1D`` multiplies by its (in, out) storage, which sums in another order: ~1 ulp apart).
        """
        weight = dense_weight(layer).detach()
        m, n = weight.shape
        full = min(m, n)
        rank = full if rank is None else rank
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if rank >= full:
            eye = torch.eye(full, device=weight.device, dtype=weight.dtype)
            U, V = (weight, eye) if n <= m else (eye, weight)
        else:
            from rankcut.linalg import split_factors, truncated_svd

            u, s, vh = truncated_svd(weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32), rank)
            U, V = split_factors(u, s, vh)
        return cls.from_factors(U, V, getattr(layer, "bias", None), dtype=weight.dtype)

    def to_dense(self) -> nn.Linear:
        """The product ``U V`` as an ``nn.Linear`` (same dtype and device)."""
        w = self.U.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.U.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_((self.U.weight.float() @ self.V.weight.float()).to(w.dtype) if w.dtype != torch.float64 else self.U.weight @ self.V.weight)
            if self.U.bias is not None:
                dense.bias.copy_(self.U.bias)
        return dense
