"""``tucker``: Tucker decomposition by HOOI (seed 004's Algorithm 1), of single matrices and of stacked tensors
whose factors are shared: the same projection of G layers, or the heads of one projection.

Each slice is first preconditioned by its calibration statistic (SVD-LLM's whitening, ``W L`` with
``L Lᵀ = XᵀX``), the decomposition is taken there and the input factor is mapped back (``U_inᵀ L⁻¹``), as the
spectral methods do. ``group`` says what is stacked:

- ``matrix``: one target; HOOI with r_out = r_in = r reaches the truncated SVD (Eckart–Young), and the core
  is folded into a :class:`~rankcut.modules.LowRankLinear` (as fast as the two-factor layer): this is
  ``whiten`` computed by HOOI.
- ``heads``: each attention projection as a (heads × head_dim × in) tensor (q/k/v) or (heads × out ×
  head_dim) (the output projection); Tucker-2 with factors shared by the heads and one core per head
  (:class:`~rankcut.modules.TuckerLinear`). Other targets are decomposed as ``matrix``. The q/k/v heads read
  one input, so their whitening is exact; the output projection's heads read different slices of its
  input, and its shared input factor is whitened by the heads' pooled statistics.
- ``layers``: the same tensor type of ``group_size`` consecutive layers (0: all). With ``share="in"``
  (default; Basis Sharing's construction, arXiv:2410.03765) the layers share an input basis B (n × r) and each
  keeps its coefficients D_g (m × r): B spans the stacked ``[W_g L̄]`` under the group's pooled whitening, and
  each D_g is then the exact minimiser of its own layer's whitened error. With ``share="out"`` they share an
  output basis U (m × r) and keep C_g (r × n): U is the exact minimiser of the sum of the layers' own
  whitened errors (:func:`rankcut.linalg.shared_output_basis`). ``share="auto"`` shares the larger side. With
  ``share="both"`` both factors are shared and each layer keeps an r × r core (Tucker-2 by HOOI), the shared
  input factor whitened by the pooled statistics.

Ranks. A unit's one rank knob r is the shared (or only) inner rank; per head the head-side rank is
min(r, head_dim). Allocation policies size units by their true parameter count (:class:`TuckerUnit`). The
spectrum a policy reads is exact for ``matrix`` and ``layers``/``out``; for the two-sided forms it is the
output mode's HOSVD spectrum, an estimate, and the decomposition itself is HOOI at the chosen ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rankcut.linalg import hooi, safe_cholesky, shared_output_basis
from rankcut.methods.base import MethodConfig, Preconditioned, register_group
from rankcut.methods.spectral import SpectralCandidate
from rankcut.modules.dense import dense_weight
from rankcut.modules.shared import SharedBasisLinear, TuckerLinear
from rankcut.units import Candidate, TargetInfo, Unit

GROUPS = ("matrix", "heads", "layers")
SHARES = ("auto", "out", "in", "both")
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin")


@dataclass(frozen=True)
class TuckerConfig(MethodConfig):
    """``tucker``'s settings."""

    group: str = field(default="matrix", metadata={"help": "what is stacked: matrix, heads or layers"})
    group_size: int = field(default=0, metadata={"help": "layers: consecutive layers per group (0: all)"})
    share: str = field(default="in", metadata={
        "help": "layers: share the input basis (in), the output basis (out), the larger side's (auto) or both factors"})
    precondition: str = field(default="whiten", metadata={"help": "whiten (by the calibration Gram) or none"})
    tol: float = field(default=1e-8, metadata={"help": "HOOI: relative change of the captured energy to stop at"})
    max_iter: int = field(default=50, metadata={"help": "HOOI: maximum iterations"})
    damping: float = field(default=1e-6, metadata={"help": "Cholesky damping tried first on a singular Gram"})

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {self.group!r}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {', '.join(SHARES)}, got {self.share!r}")
        if self.precondition not in ("whiten", "none"):
            raise ValueError(f"precondition must be 'whiten' or 'none', got {self.precondition!r}")
        for name, value, low in (("group_size", self.group_size, 0), ("max_iter", self.max_iter, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("tol", self.tol), ("damping", self.damping)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")


# ---------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class TuckerUnit(Unit):
    """A unit whose parameters are not ``Σ r(m+n)``: ``layout`` is ``shared_out``, ``shared_in``,
    ``shared_both`` or ``heads`` (with ``heads`` slices on ``side``)."""

    layout: str = "shared_out"
    heads: int = 1
    side: str = "out"

    def head_rank(self, rank: int) -> int:
        m, n = self.targets[0].shape
        return min(rank, (m if self.side == "out" else n) // self.heads)

    @property
    def rank_cap(self) -> int:
        m, n = self.targets[0].shape
        if self.layout == "shared_out" or (self.layout == "heads" and self.side == "in"):
            return m
        if self.layout == "shared_in" or self.layout == "heads":
            return n
        return min(m, n)

    def params(self, rank: int) -> int:
        m, n = self.targets[0].shape
        if self.layout == "shared_out":
            return m * rank + rank * sum(t.shape[1] for t in self.targets)
        if self.layout == "shared_in":
            return n * rank + rank * sum(t.shape[0] for t in self.targets)
        if self.layout == "shared_both":
            return rank * (m + n) + len(self.targets) * rank * rank
        h = self.head_rank(rank)
        if self.side == "out":  # inner n×r, outer d×h, cores H·h×r
            return n * rank + (m // self.heads) * h + self.heads * h * rank
        return m * rank + (n // self.heads) * h + self.heads * h * rank


def _layer_units(targets: list[TargetInfo], config: TuckerConfig) -> list[Unit]:
    kinds: dict[str, list[TargetInfo]] = {}
    for t in targets:
        kinds.setdefault(t.kind if t.block is not None else t.name, []).append(t)
    units = []
    for kind, members in kinds.items():
        members = sorted(members, key=lambda t: (t.block is None, t.block or 0))
        size = config.group_size or len(members)
        for start in range(0, len(members), size):
            group = tuple(members[start:start + size])
            shapes = {t.shape for t in group}
            if len(shapes) != 1:
                raise ValueError(f"tucker group {group[0].name}..{group[-1].name}: the layers of a group must have "
                                 f"one shape, got {sorted(shapes)}")
            units.append(TuckerUnit(group, layout=_layout(group[0].shape, config.share)))
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(units, key=lambda u: order[u.targets[0].name])


def _layout(shape: tuple[int, int], share: str) -> str:
    """``share="auto"`` shares the factor on the larger side (out when m >= n): the one whose sharing saves most."""
    if share == "auto":
        share = "out" if shape[0] >= shape[1] else "in"
    return "shared_" + share


def _head_unit(t: TargetInfo) -> Unit:
    m, n = t.shape
    d = t.head_dim
    if not d:
        return Unit((t,))
    side = "in" if t.kind.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS else "out"
    size = m if side == "out" else n
    if size % d or size // d < 2:
        return Unit((t,))
    return TuckerUnit((t,), layout="heads", heads=size // d, side=side)


def tucker_units(targets: list[TargetInfo], config: TuckerConfig | None = None) -> list[Unit]:
    """The units of ``group``: one per target, one per attention projection (heads), or per layer group."""
    config = config or TuckerConfig()
    if config.group == "layers":
        return _layer_units(targets, config)
    if config.group == "heads":
        return [_head_unit(t) for t in targets]
    return [Unit((t,)) for t in targets]


# ---------------------------------------------------------------------------------------- preconditioning


def _gram(stat: torch.Tensor | None, n: int) -> torch.Tensor:
    """A target's calibration Gram matrix, checked."""
    if stat is None:
        raise ValueError("tucker with precondition='whiten' needs calibration statistics (the Gram matrix XᵀX)")
    if stat.shape != (n, n):
        raise ValueError(f"tucker statistic has shape {tuple(stat.shape)}, expected ({n}, {n})")
    return stat


def _cholesky(gram: torch.Tensor | None, n: int, config: TuckerConfig, device) -> torch.Tensor | None:
    """``L`` with ``L Lᵀ = gram`` (float64), or None for the identity (``precondition="none"``)."""
    if config.precondition == "none":
        return None
    L, _ = safe_cholesky(_gram(gram, n).to(device), damping=config.damping)
    return L


def _pooled_cholesky(grams: list, n: int, config: TuckerConfig, device) -> torch.Tensor | None:
    """The preconditioner of a factor several slices share: the Cholesky factor of their mean Gram matrix."""
    if config.precondition == "none":
        return None
    return _cholesky(sum(_gram(g, n).to(torch.float64) for g in grams) / len(grams), n, config, device)


def _apply(W: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    W = W.to(torch.float64)
    return W if L is None else W @ L.to(W)


def _unapply(R: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    """``R L⁻¹`` by a triangular solve."""
    R = R.to(torch.float64)
    if L is None:
        return R
    return torch.linalg.solve_triangular(L.to(R).mT, R.mT, upper=True).mT


# ------------------------------------------------------------------------------------------- candidates


def _bias(dense: nn.Module) -> torch.Tensor | None:
    bias = getattr(dense, "bias", None)
    return None if bias is None else bias.detach()


class SharedBasisCandidate(Candidate):
    """``layers`` + ``share`` out or in: one factor shared by the group's layers, the other per layer.

    ``side="out"``: ``basis`` is the output basis (m × k) and ``coefs`` each layer's ``C_g`` (k × n), nested in
    rank (rank r keeps the first r of each). ``side="in"``: ``basis`` is the input basis B (n × k), and each
    layer's coefficients are re-fitted at the chosen rank from ``weights`` and ``grams`` (they are not nested).
    """

    def __init__(self, unit: Unit, basis: torch.Tensor, coefs: list[torch.Tensor] | None, values: torch.Tensor,
                 total: float, side: str = "out", weights: list | None = None, grams: list | None = None) -> None:
        super().__init__(unit, int(basis.shape[1]), values.clamp_min(0).sqrt(), total)
        self.basis, self.coefs, self.side, self.weights, self.grams = basis, coefs, side, weights, grams

    def target_params(self, rank: int) -> dict[str, int]:
        out = {}
        for i, t in enumerate(self.unit.targets):
            m, n = t.shape
            own, shared = (n, m) if self.side == "out" else (m, n)
            out[t.name] = rank * own + (shared * rank if i == 0 else 0)  # the shared basis counted at its owner
        return out

    def _coefficients(self, rank: int) -> list[torch.Tensor]:
        if self.side == "out":
            return [C[:rank] for C in self.coefs]
        return [_refit(W, G, self.basis[:, :rank].to(torch.float64)) for W, G in zip(self.weights, self.grams)]

    def build(self, rank: int, dense: dict[str, nn.Module]) -> dict[str, nn.Module]:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank} (decomposed up to {self.max_rank})")
        shared_name = "U" if self.side == "out" else "V"
        basis = self.basis[:, :rank] if self.side == "out" else self.basis[:, :rank].mT
        built, owner = {}, None
        for t, C in zip(self.unit.targets, self._coefficients(rank)):
            weight = dense_weight(dense[t.name])
            bias = _bias(dense[t.name])
            layer = SharedBasisLinear(t.shape[1], t.shape[0], rank, bias=bias is not None, device=weight.device,
                                      dtype=weight.dtype)
            own = layer.V if self.side == "out" else layer.U
            with torch.no_grad():
                own.weight.copy_(C)
                if bias is not None:
                    layer.bias.copy_(bias)
                if owner is None:
                    getattr(layer, shared_name).weight.copy_(basis)
                    layer.shares = [f"{shared_name}.weight"] if len(self.unit.targets) > 1 else []
                    owner = (t.name, layer)
                else:
                    layer.tie(f"{shared_name}.weight", f"{owner[0]}.{shared_name}.weight",
                              getattr(owner[1], shared_name).weight)
            built[t.name] = layer
        return built

    def compact(self, dtype: torch.dtype | None = None) -> Candidate:
        if dtype is None or self.side == "in":
            return self
        return SharedBasisCandidate(self.unit, self.basis.to(dtype), [c.to(dtype) for c in self.coefs],
                                    self.spectrum ** 2, self.total)


def _refit(W: torch.Tensor, G: torch.Tensor | None, B: torch.Tensor) -> torch.Tensor:
    """The coefficients ``D`` minimising ``‖(W − D Bᵀ) L‖`` (``L Lᵀ = G``; None: the identity):
    ``D = W G B (Bᵀ G B)⁻¹``."""
    W = W.to(torch.float64)
    G = torch.eye(W.shape[1], dtype=torch.float64) if G is None else G.to(torch.float64)
    return torch.linalg.lstsq(B.mT @ G @ B, (W @ G @ B).mT).solution.mT


class TwoSidedCandidate(Candidate):
    """Tucker-2 of preconditioned slices (``heads`` or ``layers`` + ``share="both"``), HOOI at the chosen ranks.

    ``slices``: the preconditioned (float64, host) slices; ``L``: the preconditioner of the input factor (None:
    identity); the spectrum is the output mode's HOSVD spectrum (an estimate of the captured energy)."""

    def __init__(self, unit: TuckerUnit, slices: list[torch.Tensor], L: torch.Tensor | None, max_rank: int,
                 config: TuckerConfig) -> None:
        M = sum(s @ s.mT for s in slices)
        values = torch.linalg.eigvalsh((M + M.mT) / 2).flip(0)[:max_rank].clamp_min(0)
        super().__init__(unit, max_rank, values.sqrt(), float(torch.diagonal(M).sum()))
        self.slices, self.L, self.config = slices, L, config
        self.info: dict = {}

    def target_params(self, rank: int) -> dict[str, int]:
        unit = self.unit
        if unit.layout == "heads":
            return {unit.targets[0].name: unit.params(rank)}
        shared = unit.params(rank) - len(unit.targets) * rank * rank
        return {t.name: rank * rank + (shared if i == 0 else 0) for i, t in enumerate(unit.targets)}

    def _ranks(self, rank: int) -> tuple[int, int]:
        unit = self.unit
        if unit.layout == "heads":
            h = unit.head_rank(rank)
            return (h, rank) if unit.side == "out" else (rank, h)
        return rank, rank

    def build(self, rank: int, dense: dict[str, nn.Module]) -> dict[str, nn.Module]:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank} (decomposed up to {self.max_rank})")
        r_out, r_in = self._ranks(rank)
        U_out, cores, U_in, self.info = hooi(self.slices, r_out, r_in, tol=self.config.tol,
                                             max_iter=self.config.max_iter)
        inner = _unapply(U_in.mT, self.L)  # (r_in × n_slice)
        unit = self.unit
        if unit.layout == "heads":
            t = unit.targets[0]
            weight = dense_weight(dense[t.name])
            core = torch.cat(cores, 0) if unit.side == "out" else torch.cat(cores, 1)
            layer = self._layer(t, weight, dense[t.name], r_out, r_in, unit.heads, unit.side)
            with torch.no_grad():
                layer.inner.weight.copy_(inner)
                layer.core.weight.copy_(core)
                layer.outer.weight.copy_(U_out)
            return {t.name: layer}
        built, owner = {}, None
        for t, core in zip(unit.targets, cores):
            weight = dense_weight(dense[t.name])
            layer = self._layer(t, weight, dense[t.name], r_out, r_in, 1, "out")
            with torch.no_grad():
                layer.core.weight.copy_(core)
                if owner is None:
                    layer.inner.weight.copy_(inner)
                    layer.outer.weight.copy_(U_out)
                    layer.shares = ["inner.weight", "outer.weight"] if len(unit.targets) > 1 else []
                    owner = (t.name, layer)
                else:
                    for local in ("inner.weight", "outer.weight"):
                        layer.tie(local, f"{owner[0]}.{local}", owner[1].get_parameter(local))
            built[t.name] = layer
        return built

    @staticmethod
    def _layer(t: TargetInfo, weight: torch.Tensor, dense: nn.Module, r_out: int, r_in: int, heads: int,
               side: str) -> TuckerLinear:
        bias = _bias(dense)
        layer = TuckerLinear(t.shape[1], t.shape[0], r_out, r_in, heads, side, bias=bias is not None,
                             device=weight.device, dtype=weight.dtype)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer


# ---------------------------------------------------------------------------------------------- method


@register_group("tucker", stat="gram", reference="De Lathauwer et al. 2000 (HOOI); seed 004 (Moar et al.), "
                "Algorithm 1; Basis Sharing, arXiv:2410.03765", config=TuckerConfig, units=tucker_units)
def tucker(items: list, config: TuckerConfig, rank: int, seed: int = 0) -> Candidate:
    """Decompose one unit (see the module docstring) up to ``rank``.

    Raises:
        ValueError: slices of different shapes, a rank outside a factor's dimensions, a missing statistic.
    """
    first = items[0]
    m, n = first.W.shape
    device = first.W.device
    tunit = _unit_of(items, config)
    layout = getattr(tunit, "layout", "matrix")
    if layout == "matrix":
        return _matrix(first, config, rank, tunit)
    if rank > tunit.rank_cap:
        raise ValueError(f"core rank {rank} exceeds the factors' dimensions ({m}, {n}): at most {tunit.rank_cap} "
                         f"for layout {tunit.layout}")
    if layout == "shared_out":
        grams = [None if config.precondition == "none" else _gram(i.stat, n) for i in items]
        basis, values, total = shared_output_basis([i.W for i in items], grams, rank)
        coefs = [(basis.mT @ i.W.to(torch.float64)).cpu() for i in items]
        return SharedBasisCandidate(tunit, basis.cpu(), coefs, values.cpu(), total)
    if layout == "shared_in":
        return _shared_input(items, config, rank, tunit)
    if layout == "shared_both":
        L = _pooled_cholesky([i.stat for i in items], n, config, device)
        slices = [_apply(i.W, L).cpu() for i in items]
        return TwoSidedCandidate(tunit, slices, None if L is None else L.cpu(), rank, config)
    # heads
    W, H = first.W.to(torch.float64), tunit.heads
    if tunit.side == "out":
        L = _cholesky(first.stat, n, config, device)
        d = m // H
        slices = [_apply(W[h * d:(h + 1) * d], L).cpu() for h in range(H)]
    else:
        d = n // H
        G = None if config.precondition == "none" else _gram(first.stat, n)
        L = _pooled_cholesky([None if G is None else G[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(H)],
                             d, config, device)
        slices = [_apply(W[:, h * d:(h + 1) * d], L).cpu() for h in range(H)]
    return TwoSidedCandidate(tunit, slices, None if L is None else L.cpu(), rank, config)


def _shared_input(items: list, config: TuckerConfig, rank: int, unit: TuckerUnit) -> SharedBasisCandidate:
    """``W_g ≈ D_g Bᵀ`` with the input basis ``B`` (n × rank) shared: the right singular subspace of the stacked
    ``[W_g L̄]`` under the group's pooled whitening ``L̄`` (Basis Sharing's construction), then each ``D_g``
    the exact minimiser of its own layer's whitened error for that basis, ``W_g G_g B (Bᵀ G_g B)⁻¹``.

    The spectrum (for policies) is the stacked matrix's under the pooled whitening, an estimate of the layers'
    own errors."""
    n = items[0].W.shape[1]
    grams = [None if config.precondition == "none" else _gram(i.stat, n).to(torch.float64) for i in items]
    L = _pooled_cholesky(grams, n, config, items[0].W.device)
    # the right singular subspace of the stacked [W_g L̄] is the output basis of the transposed slices
    V, values, total = shared_output_basis([_apply(i.W, L).mT for i in items], [None] * len(items), rank)
    B = _unapply(V.mT, L).mT  # n × rank: x ↦ Bᵀ x
    weights = [i.W.detach().to(torch.float64).cpu() for i in items]
    grams = [None if G is None else G.cpu() for G in grams]
    return SharedBasisCandidate(unit, B.cpu(), None, values.cpu(), total, side="in", weights=weights, grams=grams)


def _unit_of(items: list, config: TuckerConfig) -> Unit:
    """The unit these items form (rebuilt from their infos exactly as :func:`tucker_units` formed it)."""
    targets = [i.target for i in items]
    shapes = {t.shape for t in targets}
    if len(shapes) != 1:
        raise ValueError(f"the slices of a stacked tensor must have one shape, got {sorted(shapes)}")
    if config.group == "layers":
        return TuckerUnit(tuple(targets), layout=_layout(targets[0].shape, config.share))
    if config.group == "heads":
        return _head_unit(targets[0])
    return Unit(tuple(targets))


def _matrix(item, config: TuckerConfig, rank: int, unit: Unit) -> SpectralCandidate:
    """One target: HOOI at r_out = r_in = ``rank`` of ``W L``, its core's SVD folded into the factors."""
    m, n = item.W.shape
    if rank > min(m, n):
        raise ValueError(f"core rank {rank} exceeds the factors' dimensions ({m}, {n})")
    L = _cholesky(item.stat, n, config, item.W.device)
    A = _apply(item.W, L)
    U_out, cores, U_in, _ = hooi([A], rank, rank, tol=config.tol, max_iter=config.max_iter)
    P, S, Qh = torch.linalg.svd(cores[0])
    total = float((A * A).sum())
    pre = Preconditioned(A=A, unapply=lambda R: _unapply(R, L).to(R.dtype))
    return SpectralCandidate(unit, (U_out @ P).to(torch.float32), S, (Qh @ U_in.mT).to(torch.float32), pre, total)
