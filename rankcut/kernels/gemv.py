"""Triton GEMV for *dense* projections at one token: ``y = x Wᵀ + b`` with ``x`` (1, K), ``W`` (N, K) row-major.

cuBLAS's GEMV left a quarter of the H200's bandwidth unused on decode shapes and launches without programmatic
dependent launch (measured, ``benchmarks/plan_sweep.py``: 4096×4096 bf16 13.3 µs = 2.5 TB/s against 9.0 µs =
3.7 TB/s here; 4.1–4.4 TB/s for 11008–22016 × 4096). The kernel is the low-rank phase 1
(:mod:`rankcut.kernels.lowrank`) without its scratch: each program streams ``block_r`` rows of ``W`` — the first
tile requested before it waits for the previous kernel — multiplies them by ``x`` in fp32 and writes its outputs
in the model dtype, bias added. Imported only when a CUDA tensor reaches :func:`rankcut.kernels.dispatch.
dense_forward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.plan import DensePlan


@triton.jit
def _dense_gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, KT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                HAS_BIAS: tl.constexpr, PDL: tl.constexpr, SINGLE: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < N
    offs = tl.arange(0, BK)
    w = tl.load(w_ptr + rows[:, None] * K + offs[None, :], mask=rmask[:, None] & (offs < K)[None, :], other=0.0)
    if PDL:  # the weights need no predecessor: the first tile is in flight before waiting for x
        gdc_wait()
    if SINGLE:  # the whole row in one tile
        xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
        if PDL:
            gdc_launch_dependents()
        y = tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
    else:  # tiles along K, the next one loading while this one is multiplied
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for _ in range(0, KT):  # KT = ⌈K / BK⌉: a constant (one compile per input width; decode has two or three)
            xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
            offs_n = offs + BK
            w_n = tl.load(w_ptr + rows[:, None] * K + offs_n[None, :], mask=rmask[:, None] & (offs_n < K)[None, :],
                          other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            w = w_n
            offs = offs_n
        if PDL:  # all weights read: let the next kernel's programs start as this grid drains
            gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def dense_gemv(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
               plan: DensePlan) -> None:
    """``y = x2d Wᵀ + b`` for ``x2d`` (1, K) contiguous, ``weight`` (N, K) contiguous, ``y`` (1, N)."""
    N, K = weight.shape
    grid = (triton.cdiv(N, plan.block_r),)
    _dense_gemv[grid](x2d, weight, bias if bias is not None else y, y, N, K, triton.cdiv(K, plan.block_k), BR=plan.block_r, BK=plan.block_k,
                      HAS_BIAS=bias is not None, PDL=plan.pdl, SINGLE=plan.block_k >= K, num_warps=plan.num_warps,
                      num_stages=1, launch_pdl=plan.pdl)
