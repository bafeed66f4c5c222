"""Quality recovery after compression: adapters on the low-rank layers, their initialisation, and the merge.

Two modes (the training loop is :mod:`rankcut.train`):

- ``factors`` (mode a): PEFT LoRA (Hu et al. 2021, arXiv:2106.09685) on each factor ``nn.Linear`` (``U`` and
  ``V``) of every :class:`~rankcut.modules.LowRankLinear`, merged back into the factors: ranks, shapes and
  speed are unchanged. Layers with factors shared across layers (:mod:`rankcut.modules.shared`) get LoRA on
  their own factors only (the per-layer coefficients or cores); with ``train_shared`` the shared factors are
  trained directly, as one parameter that every layer using it sends gradient to, so the ties survive.
- ``grow`` (mode b): a residual adapter ``y = U V x + s·B A x`` on the whole layer, merged by concatenating
  the factors, ``U' = [U, s·B]``, ``V' = [V; A]``: the rank grows by the adapter rank.

Initialisation (``init``): ``zero`` is LoRA's (A random, B zero: the model starts as compressed).
``residual`` in ``grow`` mode is LoftQ-style (Li et al. 2023, arXiv:2310.08659): the adapter starts as the best
rank-``lora_rank`` approximation of the layer's residual ``W − U V`` in the space the method truncated
(``W·diag(s)`` for asvd, ``W·L`` for whiten), i.e. the next singular directions; it needs the dense weights and
the calibration statistic. In ``factors`` mode the adapter cannot raise a layer's rank, and when ``U V`` is the
truncated SVD in the method's space the residual is orthogonal to both factors' ranges, so the best correction
of either factor alone is zero. ``residual`` there therefore means the residual of the factor itself, as in
PiSSA (Meng et al. 2024, arXiv:2404.02948): the adapter takes the factor's top ``lora_rank`` singular
directions and the frozen factor keeps the rest; the model's function is unchanged at the start.
rankcut computes that start itself (:func:`principal_factors`, :func:`apply_state`) rather than through PEFT's
``init_lora_weights="pissa"``: on float32 factors the two agree (the same adapters bit for bit, the shifted factor
to float32 rounding), but on bf16/fp16 factors PEFT shifts by the float32 adapters and then rounds the adapters to
the factor's dtype, so its start no longer computes the compressed model; a factor with fewer singular
directions than ``lora_rank`` gets a smaller adapter there than configured; and a resumed run would still need
the shift done here (tests/test_recover.py compares the two).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from rankcut.modules import LowRankLinear, low_rank_modules, rankcut_modules
from rankcut.linalg import break_even_rank, split_factors, truncated_svd
from rankcut.methods import get_method
from rankcut.targets import get_submodule_parent

if TYPE_CHECKING:
    from rankcut.config import RecoverConfig

log = logging.getLogger(__name__)


def residual_factors(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    rank: int,
    method: str = "svd",
    stat: torch.Tensor | None = None,
    options=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` correction ``B A`` of ``W ≈ U V`` in the space ``method`` truncates.

    ``options`` are the method's settings (a dict or its config dataclass; ``svd_dtype`` among them).

    The method is applied to the residual ``R = W − U V`` (every method is linear in W for a fixed statistic):
    ``R M = P S Qᵀ`` truncated to ``rank``; ``B = P √S`` and ``A = √S Qᵀ M⁻¹``. When ``U V`` is the method's
    own rank-r truncation, these are its next singular directions r+1…r+rank, and ``[U, B] [V; A]`` is the
    method's rank-(r + rank) factorisation (Eckart–Young in the method's norm).

    Returns:
        ``(B, A, S)``: B (out × rank), A (rank × in) in ``svd_dtype``, and the singular values of ``R M``.
    """
    residual = W.to(torch.float64) - U.to(torch.float64) @ V.to(torch.float64)
    spec = get_method(method)
    config = spec.make_config(options)
    pre = spec.precondition(residual.to(getattr(torch, config.svd_dtype)), stat, config)
    P, S, Qh = truncated_svd(pre.A, rank)
    B, A = split_factors(P, S, Qh)
    return B, pre.unapply(A), S


def principal_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA starting adapter ``(A, B)`` of a factor: ``scaling · B A`` is its top-``rank`` SVD truncation.

    A factor with fewer than ``rank`` singular directions gives as many rows as it has.
    """
    P, S, Qh = truncated_svd(weight.detach().to(torch.float32), rank)
    root = (S / scaling).sqrt()
    return root[:, None] * Qh, P * root


# --------------------------------------------------------------------------------------------- adapters


class ResidualAdapter(nn.Module):
    """``y = base(x) + s · B(A(x))`` around a frozen :class:`LowRankLinear` (mode ``grow``).

    ``A`` (in → r) and ``B`` (r → out) are float32 ``nn.Linear`` without bias; ``s`` is ``alpha / r``.
    """

    def __init__(self, base: LowRankLinear, rank: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        device = base.V.weight.device
        self.base, self.scaling = base, scaling
        self.A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # LoRA's choice: A random, B zero
        nn.init.zeros_(self.B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.B(self.A(self.dropout(x.to(self.A.weight.dtype))))
        return out + (delta * self.scaling).to(out.dtype)

    def merged(self) -> LowRankLinear:
        """The equivalent :class:`LowRankLinear` of rank ``base.rank + r``: ``[U, s·B] [V; A]``."""
        base = self.base
        U = torch.cat([base.U.weight.detach().float(), self.scaling * self.B.weight.detach().float()], dim=1)
        V = torch.cat([base.V.weight.detach().float(), self.A.weight.detach().float()], dim=0)
        bias = None if base.U.bias is None else base.U.bias.detach()
        return LowRankLinear.from_factors(U, V, bias, dtype=base.U.weight.dtype)


@dataclass
class Handle:
    """One adapter: its trainable ``A``/``B`` weights, scale, and the frozen weight PiSSA shifts (or None)."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    base: nn.Parameter | None


def attach(model: nn.Module, config: RecoverConfig) -> tuple[nn.Module, dict[str, Handle], dict[str, str]]:
    """Freeze ``model`` and wrap its low-rank layers with adapters (seeded by ``config.seed``).

    Returns:
        ``(trainable_model, handles, skipped)``: the model to train (a PEFT model in ``factors`` mode, ``model``
        itself in ``grow`` mode), the adapters by name, and the layers left without one and why.

    Raises:
        ValueError: the model holds no low-rank layers, or no layer can take an adapter.
    """
    modules = rankcut_modules(model)
    if not modules:
        raise ValueError("model holds no rankcut low-rank layers: compress it first")
    layers = low_rank_modules(model)
    for param in model.parameters():
        param.requires_grad_(False)
    torch.manual_seed(config.seed)
    skipped: dict[str, str] = {}
    if config.mode == "factors":
        try:
            import peft
        except ImportError:
            raise ImportError("mode factors wraps the factors with PEFT LoRA: pip install 'rankcut[recover]'") from None

        names = [f"{name}.{child}" for name, module in modules.items() for child in module.trainable_children()]
        shared = [module.get_parameter(local) for module in modules.values() for local in getattr(module, "shares", ())]
        lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank * config.scaling,
                               lora_dropout=config.lora_dropout, target_modules=names, bias="none")
        with warnings.catch_warnings():  # transformers' deprecation notice for an attribute PEFT reads
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, lora)
        handles = {}
        for name in names:
            layer = wrapped.base_model.model.get_submodule(name)
            handles[name] = Handle(layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                   layer.scaling["default"], layer.base_layer.weight)
        if config.train_shared:  # factors shared across layers train directly (one parameter, every user's gradient)
            for param in shared:
                param.requires_grad_(True)
        return wrapped, handles, skipped
    for name in modules:
        if name not in layers:
            skipped[name] = f"a {type(modules[name]).__name__} cannot grow (mode grow adapts LowRankLinear layers)"
            log.warning("%s gets no adapter: %s", name, skipped[name])
    handles = {}
    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        if layer.rank + config.lora_rank >= break_even_rank(m, n):
            skipped[name] = f"rank {layer.rank} + {config.lora_rank} reaches break-even {break_even_rank(m, n):.1f}"
            log.warning("%s gets no adapter: %s", name, skipped[name])
            continue
        adapter = ResidualAdapter(layer, config.lora_rank, config.scaling, config.lora_dropout)
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, adapter)
        handles[name] = Handle(adapter.A.weight, adapter.B.weight, config.scaling, None)
    if not handles:
        raise ValueError(f"no low-rank layer can grow by {config.lora_rank} below break-even")
    return model, handles, skipped


def initial_state(handles: dict[str, Handle], config: RecoverConfig, residual: dict | None = None) -> dict:
    """The adapters' starting values ``{name.A, name.B}``, plus ``name.shift`` for PiSSA (``factors`` +
    ``residual``). ``residual`` maps layer names to ``(B, A)`` from :func:`residual_factors` (``grow`` +
    ``residual``)."""
    state = {}
    for name, h in handles.items():
        A, B = h.A.detach().clone(), h.B.detach().clone()
        if config.init == "residual" and config.mode == "factors":
            pA, pB = principal_factors(h.base, config.lora_rank, h.scaling)
            k = pA.shape[0]
            A[:k], B[:, :k] = pA, pB  # rows beyond the factor's own rank keep LoRA's default (B = 0 there)
            state[f"{name}.shift"] = torch.ones(1)
        elif config.init == "residual":
            rB, rA = residual[name]
            root = math.sqrt(h.scaling)
            k = rA.shape[0]
            A[:k], B[:, :k] = rA / root, rB / root
        state[f"{name}.A"], state[f"{name}.B"] = A.contiguous(), B.contiguous()
    return state


@torch.no_grad()
def apply_state(handles: dict[str, Handle], state: dict) -> None:
    """Load starting values from :func:`initial_state`; with a shift, the frozen factor keeps ``W − s·B A``."""
    for name, h in handles.items():
        A, B = state[f"{name}.A"].to(h.A), state[f"{name}.B"].to(h.B)
        h.A.copy_(A)
        h.B.copy_(B)
        if f"{name}.shift" in state:
            h.base.copy_((h.base.float() - h.scaling * (B.float() @ A.float())).to(h.base.dtype))


def merge(trainable: nn.Module, model: nn.Module, config: RecoverConfig) -> nn.Module:
    """Fold the adapters into the factors and return the plain model (all parameters trainable again)."""
    if config.mode == "factors":
        model = trainable.merge_and_unload()
    else:
        for name, module in list(model.named_modules()):
            if isinstance(module, ResidualAdapter):
                parent, child = get_submodule_parent(model, name)
                setattr(parent, child, module.merged())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def keep_for_growth(shapes: list[tuple[int, int]], keep: float, lora_rank: int) -> float:
    """The largest uniform keep whose ranks, each grown by ``lora_rank``, fit in the parameters that uniform
    ``keep`` gives: compress at this keep, recover with ``grow``, and the result is as large as ``factors``.

    Args:
        shapes: the targets' (out, in) shapes.
    """
    from rankcut.units import uniform_rank

    budget = sum(uniform_rank(m, n, keep) * (m + n) for m, n in shapes)

    def size(k: float) -> int:
        return sum((uniform_rank(m, n, k) + lora_rank) * (m + n) for m, n in shapes)

    low, high = 0.0, keep
    if size(1e-9) > budget:
        raise ValueError(f"lora rank {lora_rank} alone exceeds the parameters of keep {keep}")
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if size(mid) <= budget else (low, mid)
    return low
