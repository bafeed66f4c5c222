"""What the plan phase works on: targets, units of decomposition, candidates, decisions. Pure data.

- A :class:`TargetInfo` describes one target (name, shape, block, tensor type) without holding its module.
- A :class:`Unit` is what one method call decomposes: one target, or a group of targets decomposed jointly
  (the same projection of several layers, the heads of one projection). It knows how many parameters a rank
  costs, so a policy can size it before anything is decomposed.
- A :class:`Candidate` is a unit decomposed up to some rank: its spectrum (for the policy) and how to build
  the modules at any rank up to that one (for the swap).
- A :class:`Decision` is the plan for one unit: a rank, or dense with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankcut.linalg import break_even_rank


def max_useful_rank(m: int, n: int) -> int:
    """The largest rank strictly below break-even (0 when even rank 1 does not pay, e.g. a 1×n matrix)."""
    return math.ceil(break_even_rank(m, n)) - 1


def uniform_rank(m: int, n: int, keep: float) -> int:
    """``floor(keep · mn/(m+n))``, at least 1: the rank that keeps ``keep`` of this target's parameters."""
    return max(1, math.floor(keep * break_even_rank(m, n)))


@dataclass(frozen=True)
class TargetInfo:
    """One target: module name, (out, in) shape, transformer block index (None outside the blocks) and tensor
    type (the name inside its block, e.g. ``self_attn.q_proj``)."""

    name: str
    shape: tuple[int, int]
    block: int | None = None
    kind: str = ""
    head_dim: int | None = None  # attention projections: the model's head size (None elsewhere)


@dataclass(frozen=True)
class Unit:
    """One decomposition: a target, or a group of targets sharing factors. The default parameter model is
    that of independent rank-r factorisations, ``Σ r(m+n)``; group units override :meth:`params`."""

    targets: tuple[TargetInfo, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.targets)

    @property
    def name(self) -> str:
        """A label: the target's name, or ``first..last`` for a group."""
        return self.targets[0].name if len(self.targets) == 1 else f"{self.targets[0].name}..{self.targets[-1].name}"

    @property
    def dense_params(self) -> int:
        return sum(m * n for m, n in (t.shape for t in self.targets))

    def params(self, rank: int) -> int:
        """Parameters the unit holds at ``rank``."""
        return rank * sum(m + n for m, n in (t.shape for t in self.targets))

    @property
    def rank_cap(self) -> int:
        """The largest rank the unit's structure allows (its factors' smallest dimension)."""
        return min(min(t.shape) for t in self.targets)

    @property
    def _one_matrix(self) -> bool:
        """One target with the two-factor parameter model: the closed forms of :mod:`rankcut.linalg` apply."""
        return len(self.targets) == 1 and type(self).params is Unit.params

    def _largest_rank(self, low: int, fits) -> int:
        """The largest rank in ``low..rank_cap`` whose parameters ``fits`` (``low`` if none; params() increases)."""
        high = self.rank_cap
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(self.params(mid)) else (low, mid - 1)
        return low

    @property
    def limit(self) -> int:
        """The largest rank whose parameters stay strictly below the dense ones (0: no rank pays)."""
        if self._one_matrix:
            return max_useful_rank(*self.targets[0].shape)
        return self._largest_rank(0, lambda p: p < self.dense_params)

    @property
    def break_even(self) -> float:
        """The (fractional) break-even rank, for messages."""
        if type(self).params is not Unit.params:  # a group's own parameter model: the first rank that does not pay
            return self.limit + 1.0
        if len(self.targets) == 1:
            return break_even_rank(*self.targets[0].shape)
        return self.dense_params / max(1, self.params(1))

    def uniform_rank(self, keep: float) -> int:
        """The largest rank keeping at most ``keep`` of the unit's parameters (at least 1)."""
        if self._one_matrix:
            return uniform_rank(*self.targets[0].shape, keep)
        budget = keep * self.dense_params
        return self._largest_rank(1, lambda p: p <= budget)


@dataclass(frozen=True)
class Decision:
    """The plan for one unit: ``rank`` (None: the unit stays dense) and why it stays dense."""

    rank: int | None
    reason: str = ""
    chosen: bool = False  # dense because a policy chose it within its budget (not a failed rule): logged quietly

    @property
    def dense(self) -> bool:
        return self.rank is None


class Candidate:
    """A unit decomposed up to ``max_rank``; subclasses hold the factors.

    Attributes:
        unit: what was decomposed.
        max_rank: the largest rank :meth:`build` accepts.
        spectrum: the top ``max_rank`` singular values (float64, CPU) of the matrix the method truncates.
        total: its squared Frobenius norm (the whole spectrum's energy).
    """

    def __init__(self, unit: Unit, max_rank: int, spectrum: torch.Tensor, total: float) -> None:
        self.unit, self.max_rank, self.total = unit, max_rank, total
        self.spectrum = spectrum.detach().to("cpu", torch.float64)

    def energy(self, rank: int) -> float:
        """Fraction of the squared spectrum that ``rank`` keeps."""
        if self.total <= 0:
            return 1.0
        return float((self.spectrum[:rank] ** 2).sum() / self.total)

    def truncation_loss(self, rank: int) -> float:
        """``Σ_{i>rank} σ_i²`` (the squared error the method's own norm assigns to the truncation)."""
        return max(0.0, self.total - float((self.spectrum[:rank] ** 2).sum()))

    def target_params(self, rank: int) -> dict[str, int]:
        """Parameters each target holds at ``rank`` (group methods attribute shared factors here)."""
        return {t.name: rank * (t.shape[0] + t.shape[1]) for t in self.unit.targets}

    def build(self, rank: int, dense: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The modules replacing each of the unit's dense layers (``dense``: name -> layer) at ``rank``."""
        raise NotImplementedError

    def compact(self, dtype: torch.dtype | None = None) -> Candidate:
        """A form to keep until a global plan is made: on the host, in ``dtype`` (the layers' own, so that the host
        holds at most the model plus one set of factors), without the method's working state."""
        return self
