"""Runtime activation decomposition (seed 001, D-com): the math. Pure.

A layer's input ``X`` (S × H, one prompt) is split into its **outlier channels** (columns whose largest
magnitude exceeds the layer's threshold, kept exact) and the rest, whose rank-k factorisation
``X_rest ≈ U_x Σ_x V_xᵀ`` is computed at run time (Golub–Kahan–Lanczos, :mod:`rankcut.lanczos`). A linear layer
``Y = X Wᵀ`` then runs as ``Y = X_out W_outᵀ + U_x Σ_x (V_xᵀ Wᵀ)``.

Products and their FLOP counts (multiply–adds × 2; S tokens, H input and O output channels, rank k, weight
rank r, c outlier channels), the orders of the seed's equations 4 and 5:

- dense: ``2·S·H·O``;
- input only (eq. 4), ``U_x (Σ_x (V_xᵀ Wᵀ))``: ``2·k·H·O + k·O + 2·S·k·O`` — cheaper than reconstructing X
  (``2·S·k·H + 2·S·H·O``) whenever k < S;
- input + weight (eq. 5), ``W = U_w V_w`` (O × r, r × H), ``U_x ((Σ_x (V_xᵀ V_wᵀ)) U_wᵀ)``:
  ``2·k·H·r + k·r + 2·k·r·O + 2·S·k·O``; the alternative ``(U_x (Σ_x (V_xᵀ V_wᵀ))) U_wᵀ`` costs
  ``2·k·H·r + k·r + 2·S·k·r + 2·S·r·O`` and wins when O is large relative to r and S is small;
- outlier channels add ``2·S·c·O`` (input only) or ``2·S·c·r + 2·S·r·O`` folded into the second order's last
  product (input + weight), plus the decomposition itself.

:func:`plan_order` picks the cheaper of the two orders per call; :func:`flops` states the counts (tested
against PyTorch's FLOP counter).
"""

from __future__ import annotations

import torch

from rankcut.lanczos import lanczos_svd


def outlier_mask(X: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Channels (last dim) of each prompt whose largest magnitude exceeds ``threshold`` (B × H bool; None or
    inf: no outliers)."""
    if threshold is None or threshold == float("inf"):
        return torch.zeros(X.shape[0], X.shape[-1], dtype=torch.bool, device=X.device)
    return X.abs().amax(dim=-2) > threshold


def decompose(X: torch.Tensor, rank: int, threshold: float | None = None, solver: str = "lanczos",
              reorth: str = "full") -> dict:
    """Factor each prompt of ``X`` (B × S × H): outlier channels apart, the rest at ``rank``.

    Returns:
        ``{"U": B×S×k (U_x Σ_x folded), "Vh": B×k×H, "outliers": B×H bool, "X_out": B×S×H (the outlier channels,
        zero elsewhere), "fraction": the fraction of channels extracted}``, in float32 (float64 if X is).

    Raises:
        ValueError: a rank above the sequence length or the hidden size.
    """
    B, S, H = X.shape
    if not 1 <= rank <= min(S, H):
        raise ValueError(f"activation rank {rank} must lie in 1..min(sequence {S}, hidden {H})")
    work = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    mask = outlier_mask(work, threshold)
    keep = (~mask).to(work.dtype)[:, None, :]
    rest = work * keep
    X_out = work - rest
    if solver == "lanczos":
        U, Sv, Vh = lanczos_svd(rest, rank, reorth=reorth)
    elif solver == "exact":
        U, Sv, Vh = torch.linalg.svd(rest, full_matrices=False)
        U, Sv, Vh = U[..., :rank], Sv[..., :rank], Vh[..., :rank, :]
    else:
        raise ValueError(f"unknown activation solver {solver!r}; choose lanczos or exact")
    return {"U": U * Sv[:, None, :], "Vh": Vh, "outliers": mask, "X_out": X_out,
            "fraction": float(mask.float().mean())}


def flops(kind: str, S: int, H: int, O: int, k: int, r: int | None = None) -> int:
    """FLOPs (2 per multiply–add; the Σ scalings counted once per element) of one prompt's product.

    ``kind``: ``dense``, ``input`` (eq. 4), ``input+weight`` (eq. 5, the order ``U_x ((Σ V_xᵀ V_wᵀ) U_wᵀ)``) or
    ``input+weight-late`` (``(U_x (Σ V_xᵀ V_wᵀ)) U_wᵀ``). Outlier channels excluded."""
    if kind == "dense":
        return 2 * S * H * O
    if kind == "input":
        return 2 * k * H * O + k * O + 2 * S * k * O
    if r is None:
        raise ValueError(f"{kind} needs the weight rank r")
    if kind == "input+weight":
        return 2 * k * H * r + k * r + 2 * k * r * O + 2 * S * k * O
    if kind == "input+weight-late":
        return 2 * k * H * r + k * r + 2 * S * k * r + 2 * S * r * O
    raise ValueError(f"unknown product {kind!r}")


def plan_order(S: int, H: int, O: int, k: int, r: int | None) -> str:
    """The cheaper product for these sizes (``input`` when the weight is dense)."""
    if r is None:
        return "input"
    early, late = flops("input+weight", S, H, O, k, r), flops("input+weight-late", S, H, O, k, r)
    return "input+weight" if early <= late else "input+weight-late"


def apply_linear(factors: dict, weight: torch.Tensor | None = None, V_w: torch.Tensor | None = None,
                 U_w: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``X Wᵀ (+ b)`` from the factors of X, for a dense ``weight`` (O × H) or a low-rank ``U_w V_w``.

    The core of the decomposition is folded into ``U`` (``U_x Σ_x``), so eq. 4 is ``U (V_xᵀ Wᵀ)`` and eq. 5 is
    ``U ((V_xᵀ V_wᵀ) U_wᵀ)`` or ``(U (V_xᵀ V_wᵀ)) U_wᵀ``, whichever :func:`plan_order` says is cheaper. Outlier
    channels go through the weight exactly."""
    U, Vh, X_out = factors["U"], factors["Vh"], factors["X_out"]
    B, S, k = U.shape
    # the products run in the weight's dtype (bf16 weights: bf16 GEMMs, as the dense layer would); the
    # decomposition itself was computed in float32 or float64
    dt = (weight if weight is not None else U_w).dtype
    if dt not in (torch.float32, torch.float64):
        U, Vh, X_out = U.to(dt), Vh.to(dt), X_out.to(dt)
    else:
        dt = U.dtype
    has_outliers = bool(factors["outliers"].any())
    if weight is not None:
        W = weight.to(dt)
        y = U @ (Vh @ W.mT)
        if has_outliers:
            y = y + X_out @ W.mT
    else:
        V_w, U_w = V_w.to(dt), U_w.to(dt)
        O, r = U_w.shape
        H = V_w.shape[1]
        inner = Vh @ V_w.mT  # k × r
        if plan_order(S, H, O, k, r) == "input+weight":
            y = U @ (inner @ U_w.mT)
            if has_outliers:
                y = y + (X_out @ V_w.mT) @ U_w.mT
        else:
            z = U @ inner
            if has_outliers:
                z = z + X_out @ V_w.mT
            y = z @ U_w.mT
    if bias is not None:
        y = y + bias.to(dt)
    return y
