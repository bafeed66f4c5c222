"""Triton kernels for ``y = (x Vᵀ) Uᵀ + b`` with quantised factors (int8, fp8 e4m3, int4), M ≤ 16 rows.

The same two launches, tiling, split-K scratch and segment addressing as :mod:`rankcut.kernels.lowrank`
(whose helpers this module reuses); the factors are dequantised in registers:

- int8 and fp8 (one scale per output channel of each factor): codes are converted to fp32 (GEMV, M = 1) or to the
  activation dtype (``tl.dot``, exact: every int8 and e4m3 value is a bf16/fp16 value; on Hopper the fp8 →
  16-bit conversion is a native instruction), and the row scale multiplies the reduced sum once per output;
- int4 (one scale per ``G`` input columns, two codes per byte, low nibble = even column): each byte is split
  into its two sign-extended nibbles, which meet the even and odd columns of the input. A phase-1 tile and a
  phase-2 chunk are exactly one group wide (``block_k = block_rk = G``, a power of two), so each row's scale is
  loaded once per tile and broadcast.

Layouts (a group of segments, as in :class:`~rankcut.modules.grouped.LowRankGroup`): V codes (R, K) or packed
(R, K/2), V scales (R,) or (R, K/G); U codes and scales flat, segment after segment: (Nᵢ, rᵢ) codes with scales
(ΣN,), or packed (Nᵢ, rᵢ/2) codes with scales (Nᵢ, ⌈rᵢ/G⌉).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.lowrank import ZERO_BLOCK, Scratch, _finish, _half, _tile, _zero_other, launch_args
from rankcut.kernels.plan import LowRankPlan

#: Convert int8 codes by the 2²³ mantissa trick (:func:`_codes`) rather than the int-to-float instruction.
MAGIC_INT8 = True


@triton.jit
def _nibbles(p):
    """The two sign-extended int4 codes of each byte of ``p`` (uint8), as fp32: (low, high)."""
    lo = (p & 15).to(tl.int32)
    hi = (p >> 4).to(tl.int32)
    lo = lo - ((lo & 8) << 1)
    hi = hi - ((hi & 8) << 1)
    return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _codes(v, FP8: tl.constexpr, MAGIC: tl.constexpr):
    """One-byte codes (loaded as uint8) as fp32: fp8 e4m3 by its hardware conversion; int8 either by the integer
    conversion, or (``MAGIC``) by placing ``code + 128`` in the mantissa of 2²³ and subtracting 2²³ + 128, which
    needs integer logic and one float subtraction instead of the slower int-to-float conversion."""
    if FP8:
        out = v.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif MAGIC:
        out = ((v ^ 0x80).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        out = v.to(tl.int8, bitcast=True).to(tl.float32)
    return out


@triton.jit
def _seg_scale_offset(j, PE0, PE1, PE2, SO1, SO2, SO3):
    return tl.where(j >= PE2, SO3, tl.where(j >= PE1, SO2, tl.where(j >= PE0, SO1, 0)))


@triton.jit
def _p1q_gemv(x_ptr, v_ptr, sv_ptr, t_ptr, sync_ptr, K, R, KCH, NGV, BR: tl.constexpr, BK: tl.constexpr,
              SPLIT: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr, INT4: tl.constexpr, G: tl.constexpr, FP8: tl.constexpr, MAGIC: tl.constexpr):
    pr = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pr * BR + tl.arange(0, BR)
    rmask = rows < R
    k_lo = pk * KCH
    k_hi = tl.minimum(K, k_lo + KCH)
    if INT4:  # one tile = one group of BK = G columns: one scale per row per tile
        K2 = K // 2
        c = k_lo // 2 + tl.arange(0, (BK // 2))
        p = tl.load(v_ptr + rows[:, None] * K2 + c[None, :], mask=rmask[:, None], other=0)
        s = tl.load(sv_ptr + rows * NGV + k_lo // G, mask=rmask, other=0.0)
        if PDL:
            gdc_wait()
        acc = tl.zeros((BR, (BK // 2)), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            xe = tl.load(x_ptr + 2 * c).to(tl.float32)
            xo = tl.load(x_ptr + 2 * c + 1).to(tl.float32)
            cn = c + (BK // 2)
            more = k0 + BK < k_hi
            p_n = tl.load(v_ptr + rows[:, None] * K2 + cn[None, :], mask=rmask[:, None] & more, other=0)
            s_n = tl.load(sv_ptr + rows * NGV + (k0 + BK) // G, mask=rmask & more, other=0.0)
            lo, hi = _nibbles(p)
            acc += (lo * xe[None, :] + hi * xo[None, :]) * s[:, None]
            p = p_n
            s = s_n
            c = cn
        if PDL:
            gdc_launch_dependents()
        t = tl.sum(acc, axis=1)
    else:
        offs = k_lo + tl.arange(0, BK)
        v = tl.load(v_ptr + rows[:, None] * K + offs[None, :], mask=rmask[:, None] & (offs < k_hi)[None, :], other=0)
        if PDL:
            gdc_wait()
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            xv = tl.load(x_ptr + offs, mask=offs < k_hi, other=0.0)
            offs_n = offs + BK
            v_n = tl.load(v_ptr + rows[:, None] * K + offs_n[None, :], mask=rmask[:, None] & (offs_n < k_hi)[None, :],
                          other=0)
            acc += _codes(v, FP8, MAGIC) * xv.to(tl.float32)[None, :]
            v = v_n
            offs = offs_n
        if PDL:
            gdc_launch_dependents()
        t = tl.sum(acc, axis=1) * tl.load(sv_ptr + rows, mask=rmask, other=0.0)
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    if SPLIT:
        tl.atomic_add(base + rows, t, mask=rmask, sem="relaxed", scope="gpu")
        _zero_other(t_ptr, sync_ptr, R, pr * tl.num_programs(1) + pk, tl.num_programs(0) * tl.num_programs(1), ZB)
    else:
        tl.store(base + rows, t, mask=rmask)


@triton.jit
def _p2q_gemv(u_ptr, su_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, R, NPROG, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3,
              SO1, SO2, SO3, BN: tl.constexpr, BRK: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
              PDL: tl.constexpr, INT4: tl.constexpr, G: tl.constexpr, FP8: tl.constexpr, MAGIC: tl.constexpr):
    j = tl.program_id(0)
    row0, rend, uoff, r0, rs, srow = _tile(j, BN, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3)
    n = row0 + tl.arange(0, BN)
    nmask = n < rend
    if INT4:  # one chunk = one group of BRK = G rank columns (the last one may be short): one scale per row
        rs2 = rs // 2
        ng = (rs + G - 1) // G
        u_rows = u_ptr + uoff // 2 + (n - srow)[:, None] * rs2
        s_rows = su_ptr + _seg_scale_offset(j, PE0, PE1, PE2, SO1, SO2, SO3) + (n - srow) * ng
        jj = tl.arange(0, (BRK // 2))
        p = tl.load(u_rows + jj[None, :], mask=nmask[:, None] & (jj < rs2)[None, :], other=0)
        s = tl.load(s_rows, mask=nmask, other=0.0)
        if PDL:
            gdc_wait()
        base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
        acc = tl.zeros((BN, (BRK // 2)), dtype=tl.float32)
        for c in range(0, ng):
            te = tl.load(base + r0 + 2 * jj, mask=jj < rs2, other=0.0)
            to = tl.load(base + r0 + 2 * jj + 1, mask=jj < rs2, other=0.0)
            jn = jj + (BRK // 2)
            p_n = tl.load(u_rows + jn[None, :], mask=nmask[:, None] & (jn < rs2)[None, :], other=0)
            s_n = tl.load(s_rows + c + 1, mask=nmask & (c + 1 < ng), other=0.0)
            lo, hi = _nibbles(p)
            acc += (lo * te[None, :] + hi * to[None, :]) * s[:, None]
            p = p_n
            s = s_n
            jj = jn
        if PDL:
            gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
    else:
        jj = tl.arange(0, BRK)
        u_rows = u_ptr + uoff + (n - srow)[:, None] * rs
        u = tl.load(u_rows + jj[None, :], mask=nmask[:, None] & (jj < rs)[None, :], other=0)
        if PDL:
            gdc_wait()
        base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
        y = tl.zeros((BN,), dtype=tl.float32)
        for c in range(0, rs, BRK):
            tv = tl.load(base + r0 + jj, mask=jj < rs, other=0.0)
            jn = jj + BRK
            u_n = tl.load(u_rows + jn[None, :], mask=nmask[:, None] & (jn < rs)[None, :], other=0)
            y += tl.sum(_codes(u, FP8, MAGIC) * tv[None, :], axis=1)
            u = u_n
            jj = jn
        if PDL:
            gdc_launch_dependents()
        y = y * tl.load(su_ptr + n, mask=nmask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nmask)
    if SPLIT:
        _finish(sync_ptr, NPROG)


@triton.jit
def _p1q_dot(x_ptr, v_ptr, sv_ptr, t_ptr, sync_ptr, M, K, R, stride_xm, KCH, NGV, BR: tl.constexpr, BK: tl.constexpr,
             SPLIT: tl.constexpr, ZB: tl.constexpr, PDL: tl.constexpr, INT4: tl.constexpr, G: tl.constexpr, FP8: tl.constexpr, MAGIC: tl.constexpr):
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
    if INT4:  # one tile = one group of BK = G columns
        K2 = K // 2
        for k0 in range(k_lo, k_hi, BK):
            c = k0 // 2 + tl.arange(0, (BK // 2))
            p = tl.load(v_ptr + rows[:, None] * K2 + c[None, :], mask=rmask[:, None], other=0)
            s = tl.load(sv_ptr + rows * NGV + k0 // G, mask=rmask, other=0.0)
            xe = tl.load(x_ptr + mrow[:, None] * stride_xm + 2 * c[None, :], mask=mmask[:, None], other=0.0)
            xo = tl.load(x_ptr + mrow[:, None] * stride_xm + 2 * c[None, :] + 1, mask=mmask[:, None], other=0.0)
            lo, hi = _nibbles(p)
            acc = tl.dot(xe, tl.trans((lo * s[:, None]).to(xe.dtype)), acc)
            acc = tl.dot(xo, tl.trans((hi * s[:, None]).to(xo.dtype)), acc)
    else:
        for k0 in range(k_lo, k_hi, BK):
            offs = k0 + tl.arange(0, BK)
            km = offs < k_hi
            v = tl.load(v_ptr + rows[:, None] * K + offs[None, :], mask=rmask[:, None] & km[None, :], other=0)
            xt = tl.load(x_ptr + mrow[:, None] * stride_xm + offs[None, :], mask=mmask[:, None] & km[None, :],
                         other=0.0)
            acc = tl.dot(xt, tl.trans(_codes(v, FP8, MAGIC).to(xt.dtype)), acc)
        acc = acc * tl.load(sv_ptr + rows, mask=rmask, other=0.0)[None, :]
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
def _p2q_dot(u_ptr, su_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, M, R, stride_ym, NPROG, PE0, PE1, PE2, N0, N1, N2, N3, R0,
             R1, R2, R3, SO1, SO2, SO3, BN: tl.constexpr, BRK: tl.constexpr, HAS_BIAS: tl.constexpr,
             SPLIT: tl.constexpr, PDL: tl.constexpr, INT4: tl.constexpr, G: tl.constexpr, FP8: tl.constexpr, MAGIC: tl.constexpr):
    if PDL:
        gdc_wait()
    j = tl.program_id(0)
    row0, rend, uoff, r0, rs, srow = _tile(j, BN, PE0, PE1, PE2, N0, N1, N2, N3, R0, R1, R2, R3)
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    n = row0 + tl.arange(0, BN)
    nmask = n < rend
    mrow = tl.arange(0, 16)
    mmask = mrow < M
    acc = tl.zeros((16, BN), dtype=tl.float32)
    dt = y_ptr.dtype.element_ty
    if INT4:  # one chunk = one group of BRK = G rank columns
        rs2 = rs // 2
        ng = (rs + G - 1) // G
        u_rows = u_ptr + uoff // 2 + (n - srow)[:, None] * rs2
        s_rows = su_ptr + _seg_scale_offset(j, PE0, PE1, PE2, SO1, SO2, SO3) + (n - srow) * ng
        for c in range(0, ng):
            jj = c * (BRK // 2) + tl.arange(0, (BRK // 2))
            jm = jj < rs2
            p = tl.load(u_rows + jj[None, :], mask=nmask[:, None] & jm[None, :], other=0)
            s = tl.load(s_rows + c, mask=nmask, other=0.0)
            tm = mmask[:, None] & jm[None, :]
            te = tl.load(base + mrow[:, None] * R + (r0 + 2 * jj)[None, :], mask=tm, other=0.0)
            to = tl.load(base + mrow[:, None] * R + (r0 + 2 * jj + 1)[None, :], mask=tm, other=0.0)
            lo, hi = _nibbles(p)
            acc = tl.dot(te.to(dt), tl.trans((lo * s[:, None]).to(dt)), acc)
            acc = tl.dot(to.to(dt), tl.trans((hi * s[:, None]).to(dt)), acc)
    else:
        for c in range(0, rs, BRK):
            jj = c + tl.arange(0, BRK)
            jm = jj < rs
            u = tl.load(u_ptr + uoff + (n - srow)[:, None] * rs + jj[None, :], mask=nmask[:, None] & jm[None, :],
                        other=0)
            tt = tl.load(base + mrow[:, None] * R + (r0 + jj)[None, :], mask=mmask[:, None] & jm[None, :], other=0.0)
            acc = tl.dot(tt.to(dt), tl.trans(_codes(u, FP8, MAGIC).to(dt)), acc)
        acc = acc * tl.load(su_ptr + n, mask=nmask, other=0.0)[None, :]
    if PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + mrow[:, None] * stride_ym + n[None, :], acc.to(dt), mask=mmask[:, None] & nmask[None, :])
    if SPLIT:
        _finish(sync_ptr, NPROG)


def launch_quant(x2d: torch.Tensor, Vc: torch.Tensor, sv: torch.Tensor, Uc: torch.Tensor, su: torch.Tensor,
                 bias: torch.Tensor | None, y: torch.Tensor, scratch: Scratch, plan: LowRankPlan, group: int = 0,
                 scale_offsets: tuple[int, int, int] = (0, 0, 0), magic: bool | None = None) -> None:
    """Run the two launches. ``group`` > 0 means int4 (packed codes, group-wise scales; ``scale_offsets`` are the
    first scale of segments 2, 3 and 4 in ``su``); otherwise int8 / fp8 codes with per-channel scales. The other
    arguments are those of :func:`rankcut.kernels.lowrank.launch` (at most four segments)."""
    M, K = x2d.shape
    R = Vc.shape[0]
    int4 = group > 0
    magic = MAGIC_INT8 if magic is None else magic
    fp8 = Vc.dtype == torch.float8_e4m3fn
    if not int4:  # one-byte codes are loaded as bytes and converted in the kernel
        Vc, Uc = Vc.view(torch.uint8), Uc.view(torch.uint8)
    b = bias if bias is not None else y
    seg, nb, kch = launch_args(scratch, plan)
    seg = (*seg, *scale_offsets)
    ngv = K // group if int4 else 0
    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages, PDL=plan.pdl, launch_pdl=plan.pdl, INT4=int4,
                G=max(group, 2), FP8=fp8, MAGIC=magic and not fp8)
    if plan.use_dot:
        _p1q_dot[(nb, plan.split_k)](x2d, Vc, sv, scratch.t, scratch.sync, M, K, R, x2d.stride(0), kch, ngv,
                                     BR=plan.block_r, BK=plan.block_k, SPLIT=plan.split, ZB=ZERO_BLOCK, **opts)
        _p2q_dot[(plan.tiles2,)](Uc, su, b, y, scratch.t, scratch.sync, M, R, y.stride(0), plan.tiles2, *seg,
                                 BN=plan.block_n, BRK=plan.block_rk, HAS_BIAS=bias is not None, SPLIT=plan.split,
                                 **opts)
    else:
        _p1q_gemv[(nb, plan.split_k)](x2d, Vc, sv, scratch.t, scratch.sync, K, R, kch, ngv, BR=plan.block_r,
                                      BK=plan.block_k, SPLIT=plan.split, ZB=ZERO_BLOCK, **opts)
        _p2q_gemv[(plan.tiles2,)](Uc, su, b, y, scratch.t, scratch.sync, R, plan.tiles2, *seg, BN=plan.block_n,
                                  BRK=plan.block_rk, HAS_BIAS=bias is not None, SPLIT=plan.split, **opts)
