"""One target, start to finish: precondition by the method, truncated SVD, rank rule, factors. Pure."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rankcut.allocate import energy_rank, max_useful_rank, uniform_rank
from rankcut.linalg import break_even_rank, split_factors, svd_top
from rankcut.methods import get_method


@dataclass
class Factorization:
    """Result for one target. ``U``/``V`` are None when the target stays dense (``reason`` says why)."""

    U: torch.Tensor | None
    V: torch.Tensor | None
    rank: int | None
    reason: str = ""
    energy: float | None = None  # fraction of ‖A‖_F² kept by the truncation (A = the method's matrix)


def method_options(fn, options: dict) -> dict:
    """The subset of ``options`` that the method function accepts as keywords."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def factorize(
    W: torch.Tensor,
    method: str,
    allocation: dict,
    stat: torch.Tensor | None = None,
    *,
    solver: str = "exact",
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
    svd_dtype: torch.dtype = torch.float32,
    options: dict | None = None,
) -> Factorization:
    """Factorise ``W`` (out×in) with ``method`` under one ``allocation`` (keep / energy / rank / dense).

    The factors come back in ``svd_dtype``; the caller casts them to the model's dtype. A rank at or
    above the break-even rank ``mn/(m+n)`` is never emitted: the target stays dense and ``reason`` says so.

    Raises:
        ValueError: W is not finite, or the method rejects its statistic.
    """
    if not torch.isfinite(W).all():
        raise ValueError("weight has non-finite values (inf/NaN)")
    m, n = W.shape
    r_star = break_even_rank(m, n)
    if allocation.get("dense"):
        return Factorization(None, None, None, "dense by override")
    limit = max_useful_rank(m, n)
    if allocation.get("keep", 0) >= 1:  # floor(r*) < r* when r* is not an integer: still lossy, so refuse
        return Factorization(None, None, None, f"keep {allocation['keep']} reaches break-even {r_star:.1f}: kept dense")
    if "keep" in allocation:
        rank = uniform_rank(m, n, allocation["keep"])
    elif "rank" in allocation:
        rank = allocation["rank"]
    else:
        rank = None
    if rank is not None and rank > limit:
        return Factorization(None, None, None, f"rank {rank} >= break-even {r_star:.1f}: kept dense")
    if limit < 1:
        return Factorization(None, None, None, f"break-even rank {r_star:.2f} < 1: kept dense")

    spec = get_method(method)
    pre = spec.fn(W.to(svd_dtype), stat, **method_options(spec.fn, options or {}))
    k = rank if rank is not None else limit
    U, S, Vh = svd_top(pre.A, k, solver=solver, oversample=oversample, power_iters=power_iters, seed=seed)
    total = float(pre.A.to(torch.float64).pow(2).sum())
    if rank is None:
        rank = energy_rank(S, total, allocation["energy"])
        if rank is None:
            return Factorization(
                None, None, None, f"energy {allocation['energy']} needs rank >= break-even {r_star:.1f}: kept dense"
            )
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    kept = float((S.to(torch.float64) ** 2).sum() / total) if total > 0 else 1.0
    Uf, Vf = split_factors(U, S, Vh)
    Vf = pre.unapply(Vf)
    if not (torch.isfinite(Uf).all() and torch.isfinite(Vf).all()):
        raise ValueError("factorisation produced non-finite factors")
    return Factorization(Uf, Vf, rank, "", kept)
