"""``LowRankLinear``: a linear layer stored as two factors (module type ``"lowrank"``)."""

from __future__ import annotations

import torch
from torch import nn

from rankcut.modules.registry import register_module_type
from rankcut.modules.dense import dense_shape, dense_weight
from rankcut.utils import dtype_name


@register_module_type
class LowRankLinear(nn.Module):
    """``y = U(V(x)) = (x Vᵀ) Uᵀ + b`` with ``V``: in→rank and ``U``: rank→out, both ``nn.Linear``.

    The bias lives on ``U``. Keeping the factors as plain ``nn.Linear`` children lets PEFT wrap each one and
    merge back without changing the rank.
    """

    record_type = "lowrank"

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

    def trainable_children(self) -> tuple[str, ...]:
        """The factor children recovery may wrap with LoRA: both are this layer's own."""
        return ("V", "U")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def record_entry(self) -> dict:
        """What the checkpoint record keeps: rank, shape and storage dtype."""
        return {"rank": self.rank, "shape": [self.out_features, self.in_features],
                "dtype": dtype_name(self.U.weight.dtype)}

    @classmethod
    def from_record(cls, entry: dict, dense: nn.Module, device: torch.device | str = "meta") -> LowRankLinear:
        """An empty layer of the recorded rank in place of the dense layer ``dense`` (its shape and bias)."""
        out_f, in_f = dense_shape(dense)
        rank = entry.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"low-rank entry needs an integer rank >= 1, got {rank!r}")
        return cls(in_f, out_f, rank, bias=getattr(dense, "bias", None) is not None, device=device)

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
