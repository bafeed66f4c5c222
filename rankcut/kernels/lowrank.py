"""Triton kernels for ``y = (x Vᵀ) Uᵀ + b`` at decode sizes (M ≤ 16 rows): two launches per layer or group.

Imported only when a CUDA tensor meets the kernel (``rankcut.kernels.dispatch``): importing ``rankcut``
never needs Triton. The tiling is described in :mod:`rankcut.kernels.plan`.

Phase 1 computes ``t = x Vᵀ`` (fp32, M × R) and phase 2 ``y = t Uᵀ + b``; each is one launch over an
occupancy-filled grid of small programs (many resident per SM hide the memory latency), which measured
faster on the H200 than one persistent launch with a software grid barrier (:mod:`rankcut.kernels.
lowrank_fused`, ``mode="fused"``): inside a CUDA graph a kernel boundary costs about 0.6 µs, the barrier
about 4 µs. M = 1 uses CUDA-core FMAs (GEMV); 2 ≤ M ≤ 16 pads to 16 rows and uses ``tl.dot``.

Split-K (``plan.split``): phase-1 programs that share rows of ``t`` add their partial sums atomically into
one of two fp32 halves, chosen by an epoch word on the device; phase 1 also zeroes the other half (its last
reader, the previous call's phase 2, has finished), and the last phase-2 program to finish advances the
epoch. Every call thus leaves the next one a zeroed half: idempotent under CUDA-graph replay, no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.glue import silu_times
from rankcut.kernels.plan import TABLE_WIDTH, LowRankPlan, tile_table

ZERO_BLOCK = 256


@triton.jit
def _half(t_ptr, sync_ptr, R, SPLIT: tl.constexpr, OTHER: tl.constexpr):
    """Base of this call's ``t``: the epoch's half when split, else the third region."""
    if SPLIT:
        e = tl.load(sync_ptr + 2, volatile=True)
        base = t_ptr + ((e + OTHER) % 2) * (16 * R)
    else:
        base = t_ptr + 2 * (16 * R)
    return base


@triton.jit
def _zero_other(t_ptr, sync_ptr, R, p, nprog, ZB: tl.constexpr):
    z_base = _half(t_ptr, sync_ptr, R, True, 1)
    for z in range(p * ZB, 16 * R, nprog * ZB):
        zo = z + tl.arange(0, ZB)
        tl.store(z_base + zo, tl.zeros((ZB,), dtype=tl.float32), mask=zo < 16 * R)


@triton.jit
def _finish(sync_ptr, nprog):
    """Count finished phase-2 programs; the last one advances the epoch."""
    tl.debug_barrier()
    d = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if d == nprog - 1:
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 2, 1, sem="release", scope="gpu")


@triton.jit
def _tile(j, BN: tl.constexpr, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3):
    """Phase-2 tile ``j`` of up to four segments, by arithmetic (no table load on the critical path): first
    row, end row of its segment, offset of its segment's U, first column of its segment in t, its rank, and
    its segment's first row. ``PEi`` is the first tile of segment i + 1."""
    s1 = j >= PE0
    s2 = j >= PE1
    s3 = j >= PE2
    first = tl.where(s3, PE2, tl.where(s2, PE1, tl.where(s1, PE0, 0)))
    rs = tl.where(s3, R3, tl.where(s2, R2, tl.where(s1, R1, R0)))
    ns = tl.where(s3, N3, tl.where(s2, N2, tl.where(s1, N1, N0)))
    srow = tl.where(s3, N0 + N1 + N2, tl.where(s2, N0 + N1, tl.where(s1, N0, 0)))
    r0 = tl.where(s3, R0 + R1 + R2, tl.where(s2, R0 + R1, tl.where(s1, R0, 0)))
    uoff = tl.where(s3, N0 * R0 + N1 * R1 + N2 * R2, tl.where(s2, N0 * R0 + N1 * R1, tl.where(s1, N0 * R0, 0)))
    return srow + (j - first) * BN, srow + ns, uoff, r0, rs, srow


@triton.jit
def _gated(x_ptr, offs, kmask, GOFF):
    """``silu(gate) · up`` of the input's columns ``offs`` (gate at ``x_ptr``, up ``GOFF`` further), rounded as
    :func:`rankcut.kernels.glue.silu_mul` rounds (the activation, then the product, to the input dtype)."""
    g = tl.load(x_ptr + offs, mask=kmask, other=0.0)
    u = tl.load(x_ptr + GOFF + offs, mask=kmask, other=0.0)
    return silu_times(g, u, x_ptr.dtype.element_ty)


@triton.jit
def _p1_input(x_ptr, r_ptr, w_ptr, s_ptr, offs, kmask, K, GOFF, eps, write_s, PRO: tl.constexpr):
    """Phase 1's input row at columns ``offs``. PRO 0: ``x`` as stored; 1: ``silu(gate) · up`` (``x_ptr`` the
    [gate | up] row); 2 and 3: ``RMSNorm(h + res)`` / ``RMSNorm(h)`` with weight ``w_ptr``, the sum ``s`` written to
    ``s_ptr`` when ``write_s`` (PRO 2 and 3 need the whole row in one tile: ``offs`` covers all K columns), rounded
    as :func:`rankcut.kernels.glue.add_rmsnorm` rounds."""
    if PRO == 0:
        xv = tl.load(x_ptr + offs, mask=kmask, other=0.0)
    elif PRO == 1:
        xv = _gated(x_ptr, offs, kmask, GOFF)
    else:
        dt = x_ptr.dtype.element_ty
        h = tl.load(x_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
        if PRO == 2:
            sv = (h + tl.load(r_ptr + offs, mask=kmask, other=0.0).to(tl.float32)).to(dt)
        else:
            sv = h.to(dt)
        if write_s:
            tl.store(s_ptr + offs, sv, mask=kmask)
        xs = sv.to(tl.float32)
        var = tl.sum(xs * xs, axis=0) / K
        nv = (xs * tl.rsqrt(var + eps)).to(dt).to(tl.float32)
        xv = (nv * tl.load(w_ptr + offs, mask=kmask, other=0.0).to(tl.float32)).to(dt)
    return xv


@triton.jit
def _p1_gemv(x_ptr, v_ptr, t_ptr, sync_ptr, K, R, KCH, r_ptr, w_ptr, s_ptr, GOFF, eps, BR: tl.constexpr,
             BK: tl.constexpr, SPLIT: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr, SINGLE: tl.constexpr,
             PRO: tl.constexpr):
    pr = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pr * BR + tl.arange(0, BR)
    rmask = rows < R
    k_lo = pk * KCH
    k_hi = tl.minimum(K, k_lo + KCH)
    offs = k_lo + tl.arange(0, BK)
    v = tl.load(v_ptr + rows[:, None] * K + offs[None, :], mask=rmask[:, None] & (offs < k_hi)[None, :], other=0.0)
    if PDL:  # weights need no predecessor: the first tile is in flight before waiting for x
        gdc_wait()
    if SINGLE:  # one tile spans the chunk: no loop, fewest registers (more programs resident per SM)
        xv = _p1_input(x_ptr, r_ptr, w_ptr, s_ptr, offs, offs < k_hi, K, GOFF, eps, pr == 0, PRO)
        if PDL:
            gdc_launch_dependents()
        t = tl.sum(v.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
    else:
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            xv = _p1_input(x_ptr, r_ptr, w_ptr, s_ptr, offs, offs < k_hi, K, GOFF, eps, False, PRO)
            offs_n = offs + BK
            v_n = tl.load(v_ptr + rows[:, None] * K + offs_n[None, :], mask=rmask[:, None] & (offs_n < k_hi)[None, :],
                          other=0.0)
            acc += v.to(tl.float32) * xv.to(tl.float32)[None, :]
            v = v_n
            offs = offs_n
        if PDL:  # all weights read: let the next kernel's programs start as this grid drains
            gdc_launch_dependents()
        t = tl.sum(acc, axis=1)
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    if SPLIT:
        tl.atomic_add(base + rows, t, mask=rmask, sem="relaxed", scope="gpu")
        _zero_other(t_ptr, sync_ptr, R, pr * tl.num_programs(1) + pk, tl.num_programs(0) * tl.num_programs(1), ZB)
    else:
        tl.store(base + rows, t, mask=rmask)


@triton.jit
def _p2_gemv(u_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, R, NPROG, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3,
             BN: tl.constexpr, BRK: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
             SINGLE: tl.constexpr):
    row0, rend, uoff, r0, rs, srow = _tile(tl.program_id(0), BN, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3)
    n = row0 + tl.arange(0, BN)
    nmask = n < rend
    jj = tl.arange(0, BRK)
    u_rows = u_ptr + uoff + (n - srow)[:, None] * rs
    u = tl.load(u_rows + jj[None, :], mask=nmask[:, None] & (jj < rs)[None, :], other=0.0)
    if PDL:  # U streams while phase 1 finishes
        gdc_wait()
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    if SINGLE:  # the whole rank in one tile: no loop, fewest registers (more programs resident per SM)
        tv = tl.load(base + r0 + jj, mask=jj < rs, other=0.0)
        if PDL:
            gdc_launch_dependents()
        y = tl.sum(u.to(tl.float32) * tv[None, :], axis=1)
    else:  # rank in chunks (less padding for ranks just above a power of two); reduce as we go (few registers)
        y = tl.zeros((BN,), dtype=tl.float32)
        for c in range(0, rs, BRK):
            tv = tl.load(base + r0 + jj, mask=jj < rs, other=0.0)
            jn = jj + BRK
            u_n = tl.load(u_rows + jn[None, :], mask=nmask[:, None] & (jn < rs)[None, :], other=0.0)
            y += tl.sum(u.to(tl.float32) * tv[None, :], axis=1)
            u = u_n
            jj = jn
        if PDL:
            gdc_launch_dependents()
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nmask)
    if SPLIT:
        _finish(sync_ptr, NPROG)


@triton.jit
def _p1_dot(x_ptr, v_ptr, t_ptr, sync_ptr, M, K, R, stride_xm, KCH, BR: tl.constexpr, BK: tl.constexpr,
            SPLIT: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    pr = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pr * BR + tl.arange(0, BR)
    rmask = rows < R
    mrow = tl.arange(0, 16)
    mmask = mrow < M
    k_lo = pk * KCH
    k_hi = tl.minimum(K, k_lo + KCH)
    acc = tl.zeros((16, BR), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs = k0 + tl.arange(0, BK)
        km = offs < k_hi
        v = tl.load(v_ptr + rows[:, None] * K + offs[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        xt = tl.load(x_ptr + mrow[:, None] * stride_xm + offs[None, :], mask=mmask[:, None] & km[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(v), acc)
    if PDL:
        gdc_launch_dependents()
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    ptrs = base + mrow[:, None] * R + rows[None, :]
    if SPLIT:
        tl.atomic_add(ptrs, acc, mask=mmask[:, None] & rmask[None, :], sem="relaxed", scope="gpu")
        _zero_other(t_ptr, sync_ptr, R, pr * tl.num_programs(1) + pk, tl.num_programs(0) * tl.num_programs(1), ZB)
    else:
        tl.store(ptrs, acc, mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _p2_dot(u_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, M, R, stride_ym, NPROG, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2,
            R3, BN: tl.constexpr, BRK: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
    row0, rend, uoff, r0, rs, srow = _tile(tl.program_id(0), BN, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3)
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    n = row0 + tl.arange(0, BN)
    nmask = n < rend
    mrow = tl.arange(0, 16)
    mmask = mrow < M
    acc = tl.zeros((16, BN), dtype=tl.float32)
    for c in range(0, rs, BRK):
        jj = c + tl.arange(0, BRK)
        jm = jj < rs
        u = tl.load(u_ptr + uoff + (n - srow)[:, None] * rs + jj[None, :], mask=nmask[:, None] & jm[None, :], other=0.0)
        tt = tl.load(base + mrow[:, None] * R + (r0 + jj)[None, :], mask=mmask[:, None] & jm[None, :], other=0.0)
        acc = tl.dot(tt.to(u.dtype), tl.trans(u), acc)
    if PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + mrow[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])
    if SPLIT:
        _finish(sync_ptr, NPROG)


class Scratch:
    """Per-call-site device state: fp32 ``t`` (3 × 16 × R: two epoch halves for split-K, one region for unsplit
    calls), four int32 words (arrivals, departures, epoch, error flag) and tile tables by block_n."""

    def __init__(self, device: torch.device, R: int, ranks: list[int], ns: list[int]) -> None:
        self.device, self.R, self.ranks, self.ns = device, R, list(ranks), list(ns)
        self.t = torch.zeros(3 * 16 * R, dtype=torch.float32, device=device)
        self.sync = torch.zeros(4, dtype=torch.int32, device=device)
        self.tables: dict[int, torch.Tensor] = {}

    def table(self, block_n: int) -> torch.Tensor:
        if block_n not in self.tables:
            flat = tile_table(self.ranks, self.ns, block_n)
            self.tables[block_n] = torch.tensor(flat, dtype=torch.int32, device=self.device)
        return self.tables[block_n]


def launch_args(scratch: Scratch, plan: LowRankPlan) -> tuple[tuple[int, ...], int, int]:
    """What both kernel families take from the segments and the plan: the four-segment addressing of phase 2
    (first tile of segments 2-4, then each segment's rows and rank, padded to four), phase 1's row blocks and
    its K chunk."""
    ns, rs = list(scratch.ns) + [0] * (4 - len(scratch.ns)), list(scratch.ranks) + [1] * (4 - len(scratch.ranks))
    ends = [sum(-(-n // plan.block_n) for n in ns[: i + 1]) for i in range(3)]
    seg = (*[e if i + 1 < len(scratch.ns) else 1 << 30 for i, e in enumerate(ends)], *ns, *rs)
    return seg, plan.tiles1 // plan.split_k, plan.block_k * plan.k_iters


#: Phase-1 input prologues (:func:`_p1_input`): the input as stored, SiLU·up of a [gate | up] row, RMSNorm of
#: a residual sum, RMSNorm of the input alone.
PROLOGUES = {"none": 0, "silu": 1, "add_rmsnorm": 2, "rmsnorm": 3}


def launch(x2d: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
           scratch: Scratch, plan: LowRankPlan, phases: tuple[int, ...] = (1, 2), prologue: dict | None = None) -> None:
    """Run the kernels: ``x2d`` (M, K) with unit column stride, ``V`` (R, K) contiguous, ``U`` the flat
    concatenation of the segments' (Nᵢ, rᵢ) factors (at most four segments in this mode), ``bias`` (ΣNᵢ) or
    None, ``y`` (M, ΣNᵢ) contiguous. ``phases`` runs only some launches (profiling of the two-launch mode; the
    result is then incomplete).

    ``prologue`` (M = 1, the two-launch GEMV path only) computes phase 1's input in the kernel:
    ``{"kind": "silu"}`` with ``x2d`` the (1, 2K) [gate | up] row; ``{"kind": "add_rmsnorm" | "rmsnorm",
    "res": (1, K) or None, "weight": (K,), "eps": float, "out": (1, K)}`` with ``x2d`` the block output ``h``:
    ``out`` receives ``h + res`` (or ``h``), phase 1 reads ``RMSNorm(out)`` (these need the whole row in one
    phase-1 tile: ``plan.k_iters == plan.split_k == 1``)."""
    kind = PROLOGUES[(prologue or {}).get("kind", "none")]
    if kind and (plan.mode == "fused" or plan.use_dot or x2d.shape[0] != 1):
        raise ValueError("a phase-1 prologue runs on the two-launch GEMV path (M = 1) only")
    if kind >= 2 and (plan.k_iters != 1 or plan.split_k != 1):
        raise ValueError("an RMSNorm prologue needs the whole row in one phase-1 tile")
    if plan.mode == "fused":
        from rankcut.kernels.lowrank_fused import launch_fused

        return launch_fused(x2d, V, U, bias, y, scratch, plan)
    M = x2d.shape[0]
    K = V.shape[1]
    R = V.shape[0]
    b = bias if bias is not None else y
    seg, nb, kch = launch_args(scratch, plan)
    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages, PDL=plan.pdl, launch_pdl=plan.pdl)
    if plan.use_dot:
        if 1 in phases:
            _p1_dot[(nb, plan.split_k)](x2d, V, scratch.t, scratch.sync, M, K, R, x2d.stride(0), kch, BR=plan.block_r,
                                        BK=plan.block_k, SPLIT=plan.split, ZB=ZERO_BLOCK, **opts)
        if 2 in phases:
            _p2_dot[(plan.tiles2,)](U, b, y, scratch.t, scratch.sync, M, R, y.stride(0), plan.tiles2, *seg, BN=plan.block_n,
                                    BRK=plan.block_rk, HAS_BIAS=bias is not None, SPLIT=plan.split, **opts)
    else:
        if 1 in phases:
            pro = prologue or {}
            res = pro.get("res")
            w = pro.get("weight", x2d)
            out = pro.get("out", x2d)
            if kind == PROLOGUES["add_rmsnorm"] and res is None:
                kind = PROLOGUES["rmsnorm"]
            _p1_gemv[(nb, plan.split_k)](x2d, V, scratch.t, scratch.sync, K, R, kch, res if res is not None else x2d,
                                         w, out, K if kind == 1 else 0, float(pro.get("eps", 0.0)), BR=plan.block_r,
                                         BK=plan.block_k, SPLIT=plan.split, ZB=ZERO_BLOCK, SINGLE=plan.k_iters == 1,
                                         PRO=kind, **opts)
        if 2 in phases:
            _p2_gemv[(plan.tiles2,)](U, b, y, scratch.t, scratch.sync, R, plan.tiles2, *seg, BN=plan.block_n,
                                     BRK=plan.block_rk, HAS_BIAS=bias is not None, SPLIT=plan.split,
                                     SINGLE=plan.block_rk >= max(scratch.ranks), **opts)


@triton.jit
def _empty_kernel(p):
    pass


def empty_launch(grid: int, dummy: torch.Tensor) -> None:
    """An empty kernel (for measuring the launch floor)."""
    _empty_kernel[(grid,)](dummy)


assert TABLE_WIDTH == 8  # the kernels hard-code 8 int32 per phase-2 tile
