"""SiLU-gated projections at one token with the activation in the projection's last kernel: ``silu(gate) · up``
for a fused [gate, up] group, written directly as the (1, I) product instead of the (1, 2I) pair that the
separate SiLU·up kernel (:func:`rankcut.kernels.glue.silu_mul`) would read back.

Each program computes the same ``BN`` rows of the gate and of the up projection, so both halves of a product
meet in registers:

- :func:`glu_phase2` is the low-rank phase 2 (:mod:`rankcut.kernels.lowrank`) for a two-segment group of equal
  widths (ranks may differ): one tile of ``U_gate`` and one of ``U_up`` per program, read against their slices
  of the phase-1 intermediate; phase 1 is the group's own launch.
- :func:`glu_gemv` is the dense GEMV (:mod:`rankcut.kernels.gemv`) over the concatenated [W_gate; W_up].

Rounding follows the unfused path: each projection's output is rounded to the model dtype (as the group would
store it), then the activation, then the product, as :func:`rankcut.kernels.glue.silu_mul` rounds. Imported only
when a CUDA tensor reaches :func:`rankcut.kernels.dispatch.glu_forward` (or under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.lowrank import Scratch, _finish, _half, launch
from rankcut.kernels.plan import DensePlan, LowRankPlan


@triton.jit
def _silu_product(g, u, dt: tl.constexpr):
    """``silu(g) · u`` of two fp32 projection outputs, rounded as the unfused path rounds."""
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (a * u).to(dt)


@triton.jit
def _rows_dot(u, u_rows, t_base, nmask, rs, BRK: tl.constexpr, SINGLE: tl.constexpr, NCH: tl.constexpr):
    """fp32 ``U_rows · t`` over a segment of rank ``rs``, ``u`` its first tile (already requested): one tile, or
    ``NCH`` = ⌈rs / BRK⌉ chunks reduced as they come (the order of the ordinary phase 2; a constant count, so
    Triton's interpreter runs it too)."""
    jj = tl.arange(0, BRK)
    if SINGLE:
        tv = tl.load(t_base + jj, mask=jj < rs, other=0.0)
        y = tl.sum(u.to(tl.float32) * tv[None, :], axis=1)
    else:
        y = tl.zeros((u.shape[0],), dtype=tl.float32)
        for _ in range(0, NCH):
            tv = tl.load(t_base + jj, mask=jj < rs, other=0.0)
            jn = jj + BRK
            u_n = tl.load(u_rows + jn[None, :], mask=nmask[:, None] & (jn < rs)[None, :], other=0.0)
            y += tl.sum(u.to(tl.float32) * tv[None, :], axis=1)
            u = u_n
            jj = jn
    return y


@triton.jit
def _p2_glu(u_ptr, b_ptr, y_ptr, t_ptr, sync_ptr, R, NPROG, I, RG, RU, BN: tl.constexpr, BRK: tl.constexpr,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, SINGLE: tl.constexpr,
            NCG: tl.constexpr, NCU: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < I
    ug_rows = u_ptr + n[:, None] * RG
    uu_rows = u_ptr + I * RG + n[:, None] * RU
    jj = tl.arange(0, BRK)
    ug = tl.load(ug_rows + jj[None, :], mask=nmask[:, None] & (jj < RG)[None, :], other=0.0)
    uu = tl.load(uu_rows + jj[None, :], mask=nmask[:, None] & (jj < RU)[None, :], other=0.0)
    if PDL:  # both U tiles stream while phase 1 finishes
        gdc_wait()
    base = _half(t_ptr, sync_ptr, R, SPLIT, 0)
    g = _rows_dot(ug, ug_rows, base, nmask, RG, BRK, SINGLE, NCG)
    u = _rows_dot(uu, uu_rows, base + RG, nmask, RU, BRK, SINGLE, NCU)
    if PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        g += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + I + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, _silu_product(g, u, y_ptr.dtype.element_ty), mask=nmask)
    if SPLIT:
        _finish(sync_ptr, NPROG)


def glu_block_n(plan: LowRankPlan) -> int:
    """Rows of each projection per GLU program: half the plan's phase-2 tile (a program then reads as many
    ``U`` elements as an ordinary phase-2 program)."""
    return max(1, plan.block_n // 2)


def glu_phase2(x2d: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
               scratch: Scratch, plan: LowRankPlan) -> None:
    """``silu(gate) · up`` into ``y`` (1, I) for a [gate, up] low-rank group: the group's phase 1 (``V`` the stacked
    (RG + RU, K) factors), then the GLU phase 2 over ``U`` = [U_gate (I × RG) | U_up (I × RU)] flat, ``bias``
    (2I) or None. ``plan`` is the group's two-launch GEMV plan (M = 1)."""
    if plan.use_dot or plan.mode != "two" or x2d.shape[0] != 1 or len(scratch.ns) != 2 or len(set(scratch.ns)) != 1:
        raise ValueError("the GLU phase 2 takes one row of a two-segment group of equal widths, two-launch GEMV plan")
    I = scratch.ns[0]
    rg, ru = scratch.ranks
    launch(x2d, V, U, bias, y, scratch, plan, phases=(1,))
    bn = glu_block_n(plan)
    grid = triton.cdiv(I, bn)
    single = plan.block_rk >= max(rg, ru)
    _p2_glu[(grid,)](U, bias if bias is not None else y, y, scratch.t, scratch.sync, int(V.shape[0]), grid, I, rg, ru,
                     BN=bn, BRK=plan.block_rk, HAS_BIAS=bias is not None, SPLIT=plan.split, PDL=plan.pdl,
                     SINGLE=single, NCG=1 if single else triton.cdiv(rg, plan.block_rk),
                     NCU=1 if single else triton.cdiv(ru, plan.block_rk), num_warps=plan.num_warps, num_stages=plan.num_stages,
                     launch_pdl=plan.pdl)


@triton.jit
def _dense_glu(x_ptr, w_ptr, b_ptr, y_ptr, I, K, KT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
               HAS_BIAS: tl.constexpr, PDL: tl.constexpr, SINGLE: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < I
    offs = tl.arange(0, BK)
    g_rows = w_ptr + rows[:, None] * K
    u_rows = w_ptr + (I + rows)[:, None] * K
    m0 = rmask[:, None] & (offs < K)[None, :]
    wg = tl.load(g_rows + offs[None, :], mask=m0, other=0.0)
    wu = tl.load(u_rows + offs[None, :], mask=m0, other=0.0)
    if PDL:  # the weights need no predecessor: the first tiles are in flight before waiting for x
        gdc_wait()
    if SINGLE:  # the whole row in one tile (the dense GEMV's single-tile order)
        xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        if PDL:
            gdc_launch_dependents()
        g = tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
        u = tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
    else:
        acc_g = tl.zeros((BR, BK), dtype=tl.float32)
        acc_u = tl.zeros((BR, BK), dtype=tl.float32)
        for _ in range(0, KT):  # KT = ⌈K / BK⌉, as in the dense GEMV
            xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            offs_n = offs + BK
            mn = rmask[:, None] & (offs_n < K)[None, :]
            wg_n = tl.load(g_rows + offs_n[None, :], mask=mn, other=0.0)
            wu_n = tl.load(u_rows + offs_n[None, :], mask=mn, other=0.0)
            acc_g += wg.to(tl.float32) * xv[None, :]
            acc_u += wu.to(tl.float32) * xv[None, :]
            wg = wg_n
            wu = wu_n
            offs = offs_n
        if PDL:
            gdc_launch_dependents()
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
    if HAS_BIAS:
        g += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + I + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, _silu_product(g, u, y_ptr.dtype.element_ty), mask=rmask)


def glu_gemv(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
             plan: DensePlan) -> None:
    """``silu(x W_gateᵀ + b_g) · (x W_upᵀ + b_u)`` into ``y`` (1, I) for ``weight`` = [W_gate; W_up] (2I, K)
    contiguous, ``bias`` (2I) or None; ``plan`` the dense plan of the (2I, K) weight."""
    n2, K = weight.shape
    if n2 % 2:
        raise ValueError(f"a [gate; up] weight has an even number of rows, got {n2}")
    I = n2 // 2
    grid = (triton.cdiv(I, plan.block_r),)
    _dense_glu[grid](x2d, weight, bias if bias is not None else y, y, I, K, triton.cdiv(K, plan.block_k),
                     BR=plan.block_r, BK=plan.block_k, HAS_BIAS=bias is not None, PDL=plan.pdl,
                     SINGLE=plan.block_k >= K, num_warps=plan.num_warps, num_stages=1, launch_pdl=plan.pdl)
