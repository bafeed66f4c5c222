"""One matrix, start to finish, outside any model: precondition, truncated SVD, rank rule, factors. Pure.

A convenience over the pipeline's pieces (the method registry, the local policies, the candidates) for
tests and for callers with a single matrix; :func:`rankcut.compress_` does the same per target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankcut.methods import Item, get_method
from rankcut.policies.overrides import rule_policy
from rankcut.units import Decision, TargetInfo, Unit
from rankcut.utils import dtype_name


@dataclass
class Factorization:
    """Result for one target. ``U``/``V`` are None when the target stays dense (``reason`` says why)."""

    U: torch.Tensor | None
    V: torch.Tensor | None
    rank: int | None
    reason: str = ""
    energy: float | None = None  # fraction of ‖A‖_F² kept by the truncation (A = the method's matrix)


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
    """Factorise ``W`` (out×in) with ``method`` under one rule (``{"keep"|"energy"|"rank": x}`` or
    ``{"dense": True}``); ``options`` are the method's own options (``alpha``, ``damping``).

    The factors come back in ``svd_dtype``. A rank at or above the break-even rank ``mn/(m+n)`` is never
    emitted: the target stays dense and ``reason`` says so.

    Raises:
        ValueError: W is not finite, an unknown method or option, or the method rejects its statistic.
    """
    if not torch.isfinite(W).all():
        raise ValueError("weight has non-finite values (inf/NaN)")
    spec = get_method(method)
    config = spec.make_config({"solver": solver, "oversample": oversample, "power_iters": power_iters,
                               "svd_dtype": dtype_name(svd_dtype), **(options or {})})
    unit = Unit((TargetInfo("W", tuple(W.shape)),))
    policy = rule_policy(allocation)
    bound = policy.bound(unit)
    if isinstance(bound, Decision):
        return Factorization(None, None, None, bound.reason)
    candidate = spec.decompose([Item(unit.targets[0], W, stat)], config, bound, seed)
    decision = policy.choose(unit, candidate)
    if decision.dense:
        return Factorization(None, None, None, decision.reason)
    U, V = candidate.factors(decision.rank)
    return Factorization(U, V, decision.rank, "", candidate.energy(decision.rank))
