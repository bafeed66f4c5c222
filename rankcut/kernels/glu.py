"""The dense gate/up projection at one token with SiLU·up as its epilogue: ``silu(x W_gateᵀ) · (x W_upᵀ)`` for a
fused dense [gate; up] group, written directly as the (1, I) product instead of the (1, 2I) pair that the
separate SiLU·up kernel (:func:`rankcut.kernels.glue.silu_mul`) would read back: one launch fewer per block.

:func:`glu_gemv` is the dense GEMV (:mod:`rankcut.kernels.gemv`) with each program reading the same ``block_r``
rows of ``W_gate`` and of ``W_up``, so both halves of a product meet in registers; tiles, reduction order and
rounding are the GEMV's (each projection's output rounded to the model dtype, then the activation, then the
product, as :func:`~rankcut.kernels.glue.silu_mul` rounds), so the result equals GEMV + SiLU·up bit for bit.

The same epilogue on the low-rank phase 2 (one tile of ``U_gate`` and one of ``U_up`` per program) was built and
measured slower in the decode step at keep 0.5 and keep 0.2 (BENCHMARKS.md, issue #15 third round), and removed.
Imported only when a CUDA tensor reaches :func:`rankcut.kernels.dispatch.glu_forward` (or under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.glue import silu_times
from rankcut.kernels.plan import DensePlan


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
    dt = y_ptr.dtype.element_ty  # each projection rounded as the GEMV stores it, then SiLU·up's rounding
    tl.store(y_ptr + rows, silu_times(g.to(dt), u.to(dt), dt), mask=rmask)


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
