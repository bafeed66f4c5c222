"""Tile plans for the low-rank kernels: pure Python, no Triton, so the dispatch logic is CPU-testable.

The kernels compute ``y = (x Vᵀ) Uᵀ + b`` for a *group* of low-rank layers that read the same input ``x``
(one layer is a group of one). The ranks are stacked: ``V`` is (R, K) with R = Σ rᵢ, and ``t = x Vᵀ``
is (M, R). Each layer ("segment") i then maps its slice of ``t`` through its own ``Uᵢ`` (Nᵢ × rᵢ).

Phase 1 splits ``V`` into tiles of ``block_r`` rows × ``block_k * k_iters`` columns (``split_k`` tiles
along K; with ``split_k > 1`` partial sums meet in an fp32 scratch by atomic adds). Phase 2 splits the
stacked output rows into tiles of ``block_n`` rows that never straddle two segments, each reading its
segment's rank in chunks of ``block_rk`` (one chunk when ``block_rk`` ≥ rank).

``mode="two"`` (default): two launches over occupancy-filled grids (:mod:`rankcut.kernels.lowrank`).
``mode="fused"``: one persistent launch with a software grid barrier (:mod:`rankcut.kernels.lowrank_fused`;
``grid`` ≤ number of SMs, ``prefetch`` requests phase-2 ``U`` tiles before phase 1), measured slower on the
H200 and kept as an option. :func:`kernel_pays` decides, per shape, whether the kernels or cuBLAS run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

MAX_M = 16  # largest number of input rows (tokens) the kernel handles; more goes to cuBLAS
TABLE_WIDTH = 8  # int32 entries per phase-2 tile in the tile table
TILE_COST = 4096  # fixed cost of one more tile per program, in weight elements (latency not hidden)


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class LowRankPlan:
    """Launch parameters of the low-rank kernel for one (M, K, segments) problem."""

    m_pad: int  # 1: GEMV path (CUDA-core FMAs); 16: tensor-core path (tl.dot) for 2 ≤ M ≤ 16
    block_r: int
    block_k: int
    k_iters: int
    split_k: int
    tiles1: int
    block_n: int
    block_rk: int
    tiles2: int
    grid: int
    mode: str  # "fused" (one launch, grid barrier) or "two" (two launches)
    prefetch: bool
    num_warps: int
    num_stages: int
    pdl: bool = False  # programmatic dependent launch (two-launch mode, Hopper+): weights load before the wait

    @property
    def use_dot(self) -> bool:
        return self.m_pad > 1

    @property
    def split(self) -> bool:
        return self.split_k > 1


#: Largest rank for which the tensor-core path (2 ≤ M ≤ 16) beat two cuBLAS calls at every measured shape
#: (BENCHMARKS.md, layer benchmark); above it such batches go to cuBLAS.
DOT_MAX_RANK = 256


def kernel_pays(m: int, ranks: list[int]) -> bool:
    """Whether the Triton kernel is the faster path for ``m`` rows. Measured on the H200: always at M = 1; at
    2 ≤ M ≤ 16 up to :data:`DOT_MAX_RANK`, and for ranks that are not multiples of 8 (cuBLAS then takes a
    path 1.5-2× slower than the kernel); otherwise two cuBLAS products are faster."""
    if not 1 <= m <= MAX_M:
        return False
    return m == 1 or max(ranks) <= DOT_MAX_RANK or any(r % 8 for r in ranks)


def _pick(candidates: list[int], score) -> int:
    """The largest candidate whose score is within 5 % of the best (fewer, bigger tiles when it costs nothing)."""
    scores = {c: score(c) for c in candidates}
    best = min(scores.values())
    return max(c for c, s in scores.items() if s <= best * 1.05)


def phase2_tiles(ns: list[int], block_n: int) -> int:
    return sum(math.ceil(n / block_n) for n in ns)


def prev_pow2(n: float) -> int:
    """Largest power of two ≤ ``n`` (1 for n < 2)."""
    return 1 if n < 2 else 1 << (int(n).bit_length() - 1)


def plan_lowrank(
    m: int,
    k: int,
    ranks: list[int],
    ns: list[int],
    num_sms: int,
    *,
    mode: str = "two",
    max_elems: int | None = None,
    block_r: int | None = None,
    block_n: int | None = None,
    prefetch: bool | None = None,
    split_k: int | None = None,
    num_stages: int | None = None,
    pdl: bool = True,
    num_warps: int | None = None,
    single_tile: bool | None = None,
    block_k: int | None = None,
    block_rk: int | None = None,
) -> LowRankPlan:
    """Choose tile sizes and grids for ``m`` input rows, input width ``k`` and segments (``ranks``, ``ns``).

    ``mode="two"`` (default): two launches over occupancy-filled grids of small programs, about
    ``2 × num_sms`` programs per phase; split-K when V has too few row blocks. ``mode="fused"``: one persistent
    launch with a grid barrier (:mod:`rankcut.kernels.lowrank_fused`).

    Args:
        m: rows of ``x`` (tokens), 1 ≤ m ≤ :data:`MAX_M`.
        k: input features.
        ranks: rank of each segment (layer) of the group.
        ns: output features of each segment.
        num_sms: multiprocessors of the device.
        mode: ``"two"`` or ``"fused"``.
        max_elems: weight elements one program loads per loop iteration (default 4096; fused: register cap).
        block_r, block_n, prefetch, split_k, num_stages, num_warps: force these instead of the heuristic.
        single_tile: M = 1 phase 2: True forces a segment's whole rank into one tile, False the chunking.
        block_k, block_rk: force the phase-1 tile width and the phase-2 rank chunk (powers of two; the int4
            kernels make both one scale group).
        pdl: launch with programmatic dependent launch (each program issues its first weight loads, then
            waits for the previous kernel; the phase-2 launch overlaps phase 1's tail).

    Returns:
        The :class:`LowRankPlan`.

    Raises:
        ValueError: arguments out of range.
    """
    if not 1 <= m <= MAX_M:
        raise ValueError(f"m must be in [1, {MAX_M}], got {m}")
    if k < 1 or not ranks or len(ranks) != len(ns) or min(ranks) < 1 or min(ns) < 1:
        raise ValueError(f"bad problem: k={k}, ranks={ranks}, ns={ns}")
    if mode not in ("fused", "two"):
        raise ValueError(f"mode must be 'fused' or 'two', got {mode!r}")
    if mode == "fused" or len(ranks) > 4:  # the two-launch kernels address at most four segments
        return _plan_fused(m, k, ranks, ns, num_sms, max_elems=max_elems, block_r=block_r, block_n=block_n,
                           prefetch=prefetch)
    E = max_elems or 4096
    want = 2 * max(1, num_sms)
    R, max_rank, N = sum(ranks), max(ranks), sum(ns)
    if m == 1:  # about 8 programs per SM in phase 1 (measured: 2 per SM left the SMs a quarter occupied)
        br = block_r or max(1, min(8, prev_pow2(R / (4 * want)), E // next_pow2(k)))
        bk = block_k or min(next_pow2(k), max(256, E // br))
        if next_pow2(k) > E and max_elems is None and block_r is None and block_k is None and R >= 2 * want:
            # K wider than one tile (the down projection): 4 rows × 2048 columns per load, measured 17 % faster
            # than one row × 4096 at 1492 × 11008 (benchmarks/plan_sweep.py; bf16 factors only: the quantised
            # kernels pass their own max_elems and keep their measured tiles)
            br, bk = min(4, prev_pow2(R / want)), min(2048, E)
        # the whole rank in one tile up to 2048; above, chunks of 512 or 1024 (least padding): measured faster
        # than one 4096-wide tile holding a single row (BENCHMARKS.md, phase profile)
        brk = min(next_pow2(max_rank), 2048)
        if (max_rank > 2048 if single_tile is None else not single_tile) and max_rank > 512:
            brk = min((1024, 512), key=lambda c: (math.ceil(max_rank / c) * c, -c))
        brk = block_rk or brk
        bn = block_n or min(prev_pow2(N / want), max(1, E // brk))
        warps, stages, m_pad = 4, num_stages or 1, 1
    else:
        br = block_r or 16
        bk = block_k or 128
        bn = block_n or 32
        brk = block_rk or max(16, min(next_pow2(max_rank), max(16, E // bn)))
        warps, stages, m_pad = 4, num_stages or 3, 16
    nb = math.ceil(R / br)
    chunks = math.ceil(k / bk)
    sk = split_k or (1 if nb >= num_sms else max(1, min(chunks, math.ceil(want / nb))))
    k_iters = math.ceil(chunks / sk)
    sk = math.ceil(chunks / k_iters)
    tiles2 = phase2_tiles(ns, bn)
    return LowRankPlan(m_pad, br, bk, k_iters, sk, nb * sk, bn, brk, tiles2, tiles2, mode, False, num_warps or warps,
                       stages, pdl)


def _plan_fused(
    m: int,
    k: int,
    ranks: list[int],
    ns: list[int],
    num_sms: int,
    *,
    max_elems: int | None = None,
    block_r: int | None = None,
    block_n: int | None = None,
    prefetch: bool | None = None,
) -> LowRankPlan:
    """The persistent single-launch plan (see :func:`plan_lowrank`, which checks the arguments)."""
    cap = max_elems or 16384
    G = max(1, num_sms)
    R, max_rank = sum(ranks), max(ranks)
    m_pad = 1 if m == 1 else 16
    if m_pad == 1:
        # GEMV (M = 1): a tile is block_r rows × block_k columns, loaded at once (no loop inside a tile), the
        # next tile's load in flight while the current one is reduced. block_k: the largest power of two that
        # wastes at most ~12 % more lanes than the tightest choice.
        options = [b for b in (1024, 2048, 4096, 8192) if b <= max(1024, cap)]
        waste = {b: math.ceil(k / b) * b for b in options}
        block_k = min(next_pow2(k), max(b for b in options if waste[b] <= min(waste.values()) * 1.12))
        split_k, k_iters = math.ceil(k / block_k), 1
        cands = [c for c in (1, 2, 4, 8, 16, 32) if c * block_k <= max(cap, block_k) and c <= next_pow2(R)] or [1]
        br = block_r or _pick(cands, lambda c: math.ceil(math.ceil(R / c) * split_k / G) * (c * block_k + TILE_COST))
        block_rk = next_pow2(max_rank)  # the whole rank of a segment in one load
        cands = [c for c in (1, 2, 4, 8, 16, 32, 64) if c * block_rk <= max(cap, block_rk)] or [1]
        bn = block_n or _pick(cands, lambda c: math.ceil(phase2_tiles(ns, c) / G) * (c * block_rk + TILE_COST))
        stages = 1
    else:
        # Tensor-core path: x (16 × block_k) · V-tileᵀ, looping over K inside a tile (pipelined loads).
        block_k = 128
        br = block_r or 32
        nb = math.ceil(R / br)
        chunks = math.ceil(k / block_k)
        split_k = max(1, min(chunks, round(G / nb)))
        k_iters = math.ceil(chunks / split_k)
        split_k = math.ceil(chunks / k_iters)
        block_rk = max(16, min(next_pow2(max_rank), 256))
        cands = [c for c in (16, 32, 64) if c * block_rk <= max(cap, 16 * block_rk)]
        bn = block_n or _pick(cands, lambda c: math.ceil(phase2_tiles(ns, c) / G) * c)
        stages = 3
    tiles1 = math.ceil(R / br) * split_k
    tiles2 = phase2_tiles(ns, bn)
    grid = min(G, max(tiles1, tiles2))
    if m_pad == 1:  # GEMV: "prefetch" = request the first U tile before phase 1 (always possible)
        can_prefetch = True
    else:  # tensor cores: one U tile per program, the whole rank in one chunk
        can_prefetch = tiles2 <= grid and max_rank <= block_rk and bn * block_rk <= max(cap, 4096)
    pre = can_prefetch if prefetch is None else (prefetch and can_prefetch)
    tile_elems = max(br * block_k, bn * block_rk)
    warps = 8 if tile_elems >= 16384 else 4
    return LowRankPlan(m_pad, br, block_k, k_iters, split_k, tiles1, bn, block_rk, tiles2, grid, "fused", pre, warps, stages)


#: Fewest output rows for which the dense GEMV (:mod:`rankcut.kernels.gemv`) runs instead of cuBLAS: below it
#: one row per program leaves SMs idle (every measured decode projection has ≥ 4096 rows).
DENSE_MIN_ROWS = 1024


@dataclass(frozen=True)
class DensePlan:
    """Launch parameters of the dense GEMV (one token): ``block_r`` rows of W per program, tiles of ``block_k``."""

    block_r: int
    block_k: int
    num_warps: int
    pdl: bool = False


def plan_dense(n: int, k: int, *, block_r: int | None = None, block_k: int | None = None,
               num_warps: int | None = None, pdl: bool = True) -> DensePlan:
    """The dense GEMV's plan for an (n, k) weight: one row per program; the whole row in one tile up to 4096
    columns (4 warps), tiles of 2048 with 8 warps above — the best of the measured variants on the H200
    (``benchmarks/plan_sweep.py``: 4096–22016 × 4096 and 4096 × 11008, bf16)."""
    if n < 1 or k < 1:
        raise ValueError(f"bad dense problem: n={n}, k={k}")
    bk = block_k or (next_pow2(k) if next_pow2(k) <= 4096 else 2048)
    return DensePlan(block_r or 1, bk, num_warps or (4 if bk >= k else 8), pdl)


def tile_table(ranks: list[int], ns: list[int], block_n: int) -> list[int]:
    """Phase-2 tile table, :data:`TABLE_WIDTH` int32 per tile: first output row, end row of its segment,
    element offset of the segment's U in the flat U buffer, the segment's first column in ``t``, its rank,
    and its first output row (the rest padding)."""
    table: list[int] = []
    row = r0 = u_off = 0
    for r, n in zip(ranks, ns):
        for start in range(row, row + n, block_n):
            table += [start, row + n, u_off, r0, r, row, 0, 0]
        row, r0, u_off = row + n, r0 + r, u_off + n * r
    return table


def with_overrides(plan: LowRankPlan, **kw) -> LowRankPlan:
    """A copy of ``plan`` with fields replaced (for experiments)."""
    return replace(plan, **kw)
