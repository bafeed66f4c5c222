"""Layers whose factors other layers share (module types ``"shared_basis"`` and ``"tucker"``).

- :class:`SharedBasisLinear`: ``y = U (V x) + b`` where one factor is a basis shared with the other layers of
  its group (Basis Sharing, arXiv:2410.03765): the output basis ``U`` (out × rank) or the input basis ``V``
  (rank × in); the other factor is the layer's own coefficients.
- :class:`TuckerLinear`: ``y = U_out (Γ (U_inᵀ x)) + b``, the Tucker-2 form of one slice of a stacked tensor.
  Stacked over layers, ``U_in`` and ``U_out`` are shared by the group's layers and ``Γ`` is each layer's core;
  stacked over the heads of one projection, the factors are shared by the heads inside the layer and ``Γ``
  holds one core per head.

A shared factor is one ``nn.Parameter`` held by every layer that reads it. :func:`rankcut.save` stores it
once and records the others as ties (safetensors has no aliasing); each module's record entry names its
ties (``"ties": {"U.weight": "<owner>.U.weight"}``) so that :func:`rankcut.load` can check that every
one was restored and fail loudly when the checkpoint lost one.
"""

from __future__ import annotations

import torch
from torch import nn

from rankcut.modules.dense import dense_shape
from rankcut.modules.registry import register_module_type
from rankcut.utils import dtype_name


def _int(entry: dict, key: str, low: int = 1) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{entry.get('type')} entry needs an integer {key} >= {low}, got {value!r}")
    return value


def _ties(entry: dict) -> dict[str, str]:
    ties = entry.get("ties", {})
    if not isinstance(ties, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ties.items()):
        raise ValueError(f"ties must map parameter names to parameter names, got {ties!r}")
    return dict(ties)


class _Shares(nn.Module):
    """What both types have: a bias of their own and the names of the parameters they share (``ties``)."""

    def _init_bias(self, out_features: int, bias: bool, device, dtype) -> None:
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.ties: dict[str, str] = {}  # local parameter -> the owner's qualified parameter name
        self.shares: list[str] = []  # local parameters shared with other layers (the owner's too)

    def tie(self, local: str, owner: str, parameter: nn.Parameter) -> None:
        """Share ``parameter`` (qualified name ``owner``, held by another layer) as this layer's ``local``."""
        module_name, _, attr = local.rpartition(".")
        setattr(self.get_submodule(module_name) if module_name else self, attr, parameter)
        self.ties[local] = owner
        if local not in self.shares:
            self.shares.append(local)

    def trainable_children(self) -> tuple[str, ...]:
        """The factor ``nn.Linear`` children that are this layer's own (recovery may wrap them with LoRA)."""
        shared = {name.rpartition(".")[0] for name in self.shares}
        return tuple(name for name in self._own_children if name not in shared)

    def _entry(self, **fields) -> dict:
        weight = next(p for p in self.parameters())
        out = {**fields, "dtype": dtype_name(weight.dtype)}
        if self.shares:
            out["shares"] = list(self.shares)
        if self.ties:
            out["ties"] = dict(self.ties)
        return out

    def _read_sharing(self, entry: dict) -> None:
        self.ties = _ties(entry)
        shares = entry.get("shares", [])
        if not isinstance(shares, list) or not all(isinstance(x, str) for x in shares):
            raise ValueError(f"shares must be a list of parameter names, got {shares!r}")
        self.shares = list(dict.fromkeys([*shares, *self.ties]))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


@register_module_type
class SharedBasisLinear(_Shares):
    """``y = U(V(x)) + bias`` with ``V`` (in → rank) or ``U`` (rank → out) shared by a group (``shares``)."""

    record_type = "shared_basis"
    _own_children = ("V", "U")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.U = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self._init_bias(out_features, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # the same Triton kernels as LowRankLinear where they pay (the bias is added apart)
            from rankcut.kernels.dispatch import lowrank_forward

            y = lowrank_forward(self, x)
            if y is not None:
                return self._add_bias(y)
        return self._add_bias(self.U(self.V(x)))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def record_entry(self) -> dict:
        return self._entry(rank=self.rank, shape=[self.out_features, self.in_features])

    @classmethod
    def from_record(cls, entry: dict, dense: nn.Module, device="meta") -> SharedBasisLinear:
        out_f, in_f = dense_shape(dense)
        layer = cls(in_f, out_f, _int(entry, "rank"), bias=getattr(dense, "bias", None) is not None, device=device)
        layer._read_sharing(entry)
        return layer

    def weight_product(self) -> torch.Tensor:
        """The dense weight it computes (float32 or float64)."""
        w = self.U.weight
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        return w.to(dt) @ self.V.weight.to(dt)


@register_module_type
class TuckerLinear(_Shares):
    """``y = outer(core(inner(x))) + bias``, per head where ``heads`` > 1.

    - ``heads == 1``: ``inner`` in → r_in, ``core`` r_in → r_out, ``outer`` r_out → out.
    - ``head_side == "out"`` (q/k/v): the output is ``heads`` slices of ``out/heads``; ``inner`` in → r_in is
      shared by the heads, ``core`` r_in → heads·r_out holds every head's core, ``outer`` r_out → out/heads is
      applied to each head's slice.
    - ``head_side == "in"`` (the attention output projection): the input is ``heads`` slices of ``in/heads``;
      ``inner`` in/heads → r_in is applied to each, ``core`` heads·r_in → r_out, ``outer`` r_out → out.
    """

    record_type = "tucker"
    _own_children = ("inner", "core", "outer")

    def __init__(self, in_features: int, out_features: int, r_out: int, r_in: int, heads: int = 1,
                 head_side: str = "out", bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if min(r_out, r_in, heads) < 1:
            raise ValueError(f"ranks and heads must be >= 1, got r_out={r_out}, r_in={r_in}, heads={heads}")
        if head_side not in ("out", "in"):
            raise ValueError(f"head_side must be 'out' or 'in', got {head_side!r}")
        side = out_features if head_side == "out" else in_features
        if side % heads:
            raise ValueError(f"{heads} heads do not divide the {head_side}put size {side}")
        self.in_features, self.out_features = in_features, out_features
        self.r_out, self.r_in, self.heads, self.head_side = r_out, r_in, heads, head_side
        per_head = side // heads
        if head_side == "out":
            self.inner = nn.Linear(in_features, r_in, bias=False, device=device, dtype=dtype)
            self.core = nn.Linear(r_in, heads * r_out, bias=False, device=device, dtype=dtype)
            self.outer = nn.Linear(r_out, per_head, bias=False, device=device, dtype=dtype)
        else:
            self.inner = nn.Linear(per_head, r_in, bias=False, device=device, dtype=dtype)
            self.core = nn.Linear(heads * r_in, r_out, bias=False, device=device, dtype=dtype)
            self.outer = nn.Linear(r_out, out_features, bias=False, device=device, dtype=dtype)
        self._init_bias(out_features, bias, device, dtype)

    @property
    def rank(self) -> int:
        return self.r_in if self.head_side == "out" else self.r_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.heads == 1:
            return self._add_bias(self.outer(self.core(self.inner(x))))
        if self.head_side == "out":
            c = self.core(self.inner(x)).view(*lead, self.heads, self.r_out)
            return self._add_bias(self.outer(c).reshape(*lead, self.out_features))
        z = self.inner(x.view(*lead, self.heads, self.in_features // self.heads)).reshape(*lead, self.heads * self.r_in)
        return self._add_bias(self.outer(self.core(z)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r_out={self.r_out}, "
                f"r_in={self.r_in}, heads={self.heads}, head_side={self.head_side}")

    def record_entry(self) -> dict:
        return self._entry(rank=self.rank, ranks=[self.r_out, self.r_in], heads=self.heads, head_side=self.head_side,
                           shape=[self.out_features, self.in_features])

    @classmethod
    def from_record(cls, entry: dict, dense: nn.Module, device="meta") -> TuckerLinear:
        out_f, in_f = dense_shape(dense)
        ranks = entry.get("ranks")
        if not (isinstance(ranks, list) and len(ranks) == 2):
            raise ValueError(f"tucker entry needs ranks [r_out, r_in], got {ranks!r}")
        r_out, r_in = (_int({"type": "tucker", "r": r}, "r") for r in ranks)
        layer = cls(in_f, out_f, r_out, r_in, _int(entry, "heads"), entry.get("head_side", "out"),
                    bias=getattr(dense, "bias", None) is not None, device=device)
        layer._read_sharing(entry)
        return layer

    def weight_product(self) -> torch.Tensor:
        """The dense (out × in) weight it computes (float32 or float64)."""
        dt = torch.float64 if self.core.weight.dtype == torch.float64 else torch.float32
        inner, core, outer = (m.weight.to(dt) for m in (self.inner, self.core, self.outer))
        H = self.heads
        if H == 1:
            return outer @ core @ inner
        if self.head_side == "out":
            cores = core.view(H, self.r_out, self.r_in)
            return torch.cat([outer @ cores[h] @ inner for h in range(H)], 0)
        cores = core.view(self.r_out, H, self.r_in)
        return torch.cat([outer @ cores[:, h] @ inner for h in range(H)], 1)
