"""Persistent single-launch variant of the low-rank kernel (``mode="fused"``): both phases in one launch,
separated by a software grid barrier.

Measured on the H200 (BENCHMARKS.md): its fixed cost is about 4.2 µs, against 0.57 µs for a kernel
boundary inside a CUDA graph, and one resident program per SM streams worse than an occupancy-filled grid,
so the default is the two-launch kernels of :mod:`rankcut.kernels.lowrank`. Kept as a selectable,
tested alternative (``plan_overrides(mode="fused")``).

Grid barrier. Every program is resident (grid ≤ number of SMs), so a spin-wait cannot deadlock. Scratch
(:class:`rankcut.kernels.lowrank.Scratch`): ``t`` in fp32 (3 × 16 × R: two halves used alternately by an
epoch counter, so that each call zeroes the half that the next call accumulates into, and a third region
for unsplit two-launch calls) and four int32 words: arrivals, departures, epoch, error flag. The last
program to leave resets the counters and advances the epoch, so the kernel is idempotent under CUDA-graph
replay. The spin is bounded: a program that waited too long sets the error flag (the tests check it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankcut.kernels.plan import LowRankPlan

SPIN_LIMIT = 1 << 22
ZERO_BLOCK = 256


@triton.jit
def _t_base(t_ptr, sync_ptr, R, PHASE: tl.constexpr):
    if PHASE == 3:
        ep = tl.load(sync_ptr + 2, volatile=True)
        base = t_ptr + (ep % 2) * (16 * R)
    else:
        base = t_ptr + 2 * (16 * R)
    return base


@triton.jit
def _barrier_and_zero(t_ptr, sync_ptr, R, pid, G, ZB: tl.constexpr, SPIN: tl.constexpr):
    """Grid-wide barrier; then zero the ``t`` half that the next call will accumulate into."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
    cnt = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    spins = cnt * 0
    while (cnt < G) & (spins < SPIN):
        cnt = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if cnt < G:
        tl.atomic_or(sync_ptr + 3, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    ep = tl.load(sync_ptr + 2, volatile=True)
    z_base = t_ptr + ((ep + 1) % 2) * (16 * R)
    for z in range(pid * ZB, 16 * R, G * ZB):
        zo = z + tl.arange(0, ZB)
        tl.store(z_base + zo, tl.zeros((ZB,), dtype=tl.float32), mask=zo < 16 * R)


@triton.jit
def _depart(sync_ptr, G):
    """The last program out resets the barrier and advances the epoch."""
    tl.debug_barrier()
    d = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if d == G - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 2, 1, sem="release", scope="gpu")


@triton.jit
def _load_u(u_ptr, tab_ptr, j, T2, BN: tl.constexpr, BRK: tl.constexpr):
    """The U tile of phase-2 tile ``j`` (zeros when j ≥ T2) and its metadata."""
    ok = j < T2
    tb = tab_ptr + j * 8
    row0 = tl.load(tb, mask=ok, other=0)
    rend = tl.load(tb + 1, mask=ok, other=0)
    uoff = tl.load(tb + 2, mask=ok, other=0)
    r0 = tl.load(tb + 3, mask=ok, other=0)
    rs = tl.load(tb + 4, mask=ok, other=1)
    srow = tl.load(tb + 5, mask=ok, other=0)
    n = row0 + tl.arange(0, BN)
    nmask = (n < rend) & ok
    jj = tl.arange(0, BRK)
    jmask = jj < rs
    u = tl.load(u_ptr + uoff + (n - srow)[:, None] * rs + jj[None, :], mask=nmask[:, None] & jmask[None, :], other=0.0)
    return u, n, nmask, r0, jmask


@triton.jit
def _gemv_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, tab_ptr, K, R, T1, T2, SK, G,
    BR: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BRK: tl.constexpr, PHASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EARLY_U: tl.constexpr, ZB: tl.constexpr, SPIN: tl.constexpr,
):
    pid = tl.program_id(0)
    if PHASE != 1:
        if EARLY_U:
            u_nxt, n_nxt, nm_nxt, r0_nxt, jm_nxt = _load_u(u_ptr, tab_ptr, pid, T2, BN, BRK)
    if PHASE != 2:
        t_base = _t_base(t_ptr, sync_ptr, R, PHASE)
        rb = pid // SK
        ks = pid - rb * SK
        rows = rb * BR + tl.arange(0, BR)
        offs_k = ks * BK + tl.arange(0, BK)
        v_nxt = tl.load(v_ptr + rows[:, None] * K + offs_k[None, :], mask=(rows < R)[:, None] & (offs_k < K)[None, :], other=0.0)
        x_nxt = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
        for i in range(pid, T1, G):
            v = v_nxt
            xv = x_nxt
            rows = (i // SK) * BR + tl.arange(0, BR)
            # request the next tile before reducing this one
            i2 = i + G
            rb2 = i2 // SK
            ks2 = i2 - rb2 * SK
            rows2 = rb2 * BR + tl.arange(0, BR)
            offs2 = ks2 * BK + tl.arange(0, BK)
            ok2 = i2 < T1
            v_nxt = tl.load(v_ptr + rows2[:, None] * K + offs2[None, :],
                            mask=((rows2 < R) & ok2)[:, None] & (offs2 < K)[None, :], other=0.0)
            x_nxt = tl.load(x_ptr + offs2, mask=(offs2 < K) & ok2, other=0.0)
            acc = tl.sum(v.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
            if SPLIT:
                tl.atomic_add(t_base + rows, acc, mask=rows < R, sem="relaxed", scope="gpu")
            else:
                tl.store(t_base + rows, acc, mask=rows < R)
    if PHASE == 3:
        _barrier_and_zero(t_ptr, sync_ptr, R, pid, G, ZB, SPIN)
    if PHASE != 1:
        t_base2 = _t_base(t_ptr, sync_ptr, R, PHASE)
        if not EARLY_U:
            u_nxt, n_nxt, nm_nxt, r0_nxt, jm_nxt = _load_u(u_ptr, tab_ptr, pid, T2, BN, BRK)
        for j in range(pid, T2, G):
            u = u_nxt
            n = n_nxt
            nmask = nm_nxt
            r0 = r0_nxt
            jmask = jm_nxt
            u_nxt, n_nxt, nm_nxt, r0_nxt, jm_nxt = _load_u(u_ptr, tab_ptr, j + G, T2, BN, BRK)
            tv = tl.load(t_base2 + r0 + tl.arange(0, BRK), mask=jmask, other=0.0, cache_modifier=".cg")
            acc2 = tl.sum(u.to(tl.float32) * tv[None, :], axis=1)
            if HAS_BIAS:
                acc2 += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + n, acc2.to(y_ptr.dtype.element_ty), mask=nmask)
    if PHASE == 3:
        _depart(sync_ptr, G)


@triton.jit
def _dot_kernel(
    x_ptr, v_ptr, u_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, tab_ptr, M, K, R, stride_xm, stride_ym, T1, T2, SK, KITER, G,
    BR: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BRK: tl.constexpr, PHASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr, ZB: tl.constexpr, SPIN: tl.constexpr,
):
    pid = tl.program_id(0)
    mrow = tl.arange(0, 16)
    mmask = mrow < M
    if PREFETCH:  # one phase-2 tile per program, whole rank in one chunk: request it before phase 1
        u_pre, p_n, p_nmask, p_r0, p_jmask = _load_u(u_ptr, tab_ptr, pid, T2, BN, BRK)
    if PHASE != 2:
        t_base = _t_base(t_ptr, sync_ptr, R, PHASE)
        for i in range(pid, T1, G):
            rb = i // SK
            ks = i - rb * SK
            rows = rb * BR + tl.arange(0, BR)
            rmask = rows < R
            k0 = ks * (BK * KITER)
            acc = tl.zeros((16, BR), dtype=tl.float32)
            for it in range(KITER):
                offs_k = k0 + it * BK + tl.arange(0, BK)
                kmask = offs_k < K
                v = tl.load(v_ptr + rows[:, None] * K + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                xt = tl.load(x_ptr + mrow[:, None] * stride_xm + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                acc = tl.dot(xt, tl.trans(v), acc)
            t_ptrs = t_base + mrow[:, None] * R + rows[None, :]
            if SPLIT:
                tl.atomic_add(t_ptrs, acc, mask=mmask[:, None] & rmask[None, :], sem="relaxed", scope="gpu")
            else:
                tl.store(t_ptrs, acc, mask=mmask[:, None] & rmask[None, :])
    if PHASE == 3:
        _barrier_and_zero(t_ptr, sync_ptr, R, pid, G, ZB, SPIN)
    if PHASE != 1:
        t_base2 = _t_base(t_ptr, sync_ptr, R, PHASE)
        if PREFETCH:
            jj = tl.arange(0, BRK)
            tt = tl.load(t_base2 + mrow[:, None] * R + (p_r0 + jj)[None, :], mask=mmask[:, None] & p_jmask[None, :],
                         other=0.0, cache_modifier=".cg")
            acc2 = tl.dot(tt.to(u_pre.dtype), tl.trans(u_pre))
            _store_rows(acc2, b_ptr, y_ptr, p_n, p_nmask, mrow, mmask, stride_ym, HAS_BIAS)
        else:
            for jt in range(pid, T2, G):
                tb = tab_ptr + jt * 8
                row0 = tl.load(tb)
                rend = tl.load(tb + 1)
                uoff = tl.load(tb + 2)
                r0 = tl.load(tb + 3)
                rs = tl.load(tb + 4)
                srow = tl.load(tb + 5)
                n = row0 + tl.arange(0, BN)
                nmask = n < rend
                acc2 = tl.zeros((16, BN), dtype=tl.float32)
                for c in range(0, rs, BRK):
                    jj = c + tl.arange(0, BRK)
                    jmask = jj < rs
                    u = tl.load(u_ptr + uoff + (n - srow)[:, None] * rs + jj[None, :], mask=nmask[:, None] & jmask[None, :], other=0.0)
                    tt = tl.load(t_base2 + mrow[:, None] * R + (r0 + jj)[None, :], mask=mmask[:, None] & jmask[None, :],
                                 other=0.0, cache_modifier=".cg")
                    acc2 = tl.dot(tt.to(u.dtype), tl.trans(u), acc2)
                _store_rows(acc2, b_ptr, y_ptr, n, nmask, mrow, mmask, stride_ym, HAS_BIAS)
    if PHASE == 3:
        _depart(sync_ptr, G)


@triton.jit
def _store_rows(acc, b_ptr, y_ptr, n, nmask, mrow, mmask, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + mrow[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def launch_fused(x2d: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 scratch, plan: LowRankPlan) -> None:
    """One persistent launch (see :func:`rankcut.kernels.lowrank.launch` for the arguments)."""
    M, K = x2d.shape
    R = V.shape[0]
    table = scratch.table(plan.block_n)
    b = bias if bias is not None else y
    common = dict(BR=plan.block_r, BK=plan.block_k, BN=plan.block_n, BRK=plan.block_rk, HAS_BIAS=bias is not None,
                  SPLIT=plan.split, ZB=ZERO_BLOCK, SPIN=SPIN_LIMIT, num_warps=plan.num_warps, num_stages=plan.num_stages)
    head = (x2d, V, U, b, y, scratch.t, scratch.sync, table)
    if plan.use_dot:
        args = head + (M, K, R, x2d.stride(0), y.stride(0), plan.tiles1, plan.tiles2, plan.split_k, plan.k_iters)
        _dot_kernel[(plan.grid,)](*args, plan.grid, PHASE=3, PREFETCH=plan.prefetch, **common)
    else:
        args = head + (K, R, plan.tiles1, plan.tiles2, plan.split_k)
        _gemv_kernel[(plan.grid,)](*args, plan.grid, PHASE=3, EARLY_U=plan.prefetch, **common)
