"""Rank allocation: which allocation rule applies to a target, and what rank it gives."""

from __future__ import annotations

import math

import torch

from rankcut.config import CompressConfig, pattern_matches
from rankcut.linalg import break_even_rank


def allocation_for(name: str, config: CompressConfig) -> dict:
    """The allocation mapping for target ``name``: the first matching override, else the global one."""
    for pattern, spec in config.overrides.items():
        if pattern_matches(pattern, name):
            # a spec that sets nothing (e.g. {"dense": False}) means the global allocation, not an empty one
            return {k: v for k, v in spec.items() if v is not None and v is not False} or config.allocation
    return config.allocation


def max_useful_rank(m: int, n: int) -> int:
    """The largest rank strictly below break-even (0 when even rank 1 does not pay, e.g. a 1×n matrix)."""
    return math.ceil(break_even_rank(m, n)) - 1


def uniform_rank(m: int, n: int, keep: float) -> int:
    """``floor(keep · mn/(m+n))``, at least 1: the rank that keeps ``keep`` of this target's parameters."""
    return max(1, math.floor(keep * break_even_rank(m, n)))


def energy_rank(S: torch.Tensor, total: float, threshold: float) -> int | None:
    """Smallest r with ``Σ_{i≤r} σ_i² ≥ threshold · total``, or None if the given singular values never
    reach it (``S`` may be only the top of the spectrum; ``total`` is the full ‖A‖_F²)."""
    if total <= 0:
        return 1
    cumulative = torch.cumsum(S.to(torch.float64) ** 2, 0) / total
    # A relative tolerance so that threshold 1.0 is reachable despite rounding in ‖A‖_F² vs Σσ².
    hits = torch.nonzero(cumulative >= threshold * (1 - 1e-12)).flatten()
    return int(hits[0]) + 1 if hits.numel() else None
