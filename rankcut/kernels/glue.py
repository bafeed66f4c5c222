"""Triton kernels for the small operations between the projections of a decode step.

Each replaces several eager kernels (a decode step at batch 1 is dominated by launch latency once the
weights stream at full bandwidth): residual add + RMSNorm, rotary embedding of q and k + the KV-cache
write, and SiLU(gate)·up. Imported lazily by :mod:`rankcut.kernels.ops`, which holds the eager fallbacks;
the numerics follow Hugging Face's Llama modules (fp32 statistics, rounding to the model dtype where they
round).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.dispatch import pdl_enabled
from rankcut.kernels.plan import next_pow2


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """With programmatic dependent launch: wait for the previous kernel, then let the next one launch early
    (these kernels are tiny; the next one can start fetching its weights)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, rout_ptr, H, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    m = o < H
    x = tl.load(x_ptr + row * H + o, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * H + o, mask=m, other=0.0).to(tl.float32)
        s = (x + r).to(y_ptr.dtype.element_ty)
        tl.store(rout_ptr + row * H + o, s, mask=m)
        xs = s.to(tl.float32)
    else:
        xs = x
    var = tl.sum(xs * xs, axis=0) / H
    h = (xs * tl.rsqrt(var + eps)).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + o, (h.to(tl.float32) * w).to(y_ptr.dtype.element_ty), mask=m)


def _pdl(t: torch.Tensor, warps: int = 4) -> dict:
    on = pdl_enabled(t.device)
    return {"PDL": on, "launch_pdl": on, "num_warps": warps}


def add_rmsnorm(h: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """``s = res + h`` (or ``h``), ``y = weight · s / rms(s)``; returns ``(y, s)``."""
    H = h.shape[-1]
    x = h.contiguous()
    rows = x.numel() // H
    y = torch.empty_like(x)
    if res is None:
        _add_rmsnorm_kernel[(rows,)](x, x, weight, y, y, H, eps, HAS_RES=False, BLOCK=next_pow2(H), **_pdl(x))
        return y, h
    s = torch.empty_like(x)
    _add_rmsnorm_kernel[(rows,)](x, res.contiguous(), weight, y, s, H, eps, HAS_RES=True, BLOCK=next_pow2(H), **_pdl(x))
    return y, s


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, pos_ptr, T, H, HKV, TMAX, stride_row, stride_cs,
                       D: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)  # b * T + t
    j = tl.program_id(1)  # head among H (q), HKV (k), HKV (v)
    b = row // T
    t = row - b * T
    pos = tl.load(pos_ptr) + t
    d = tl.arange(0, HALF)
    src = qkv_ptr + row * stride_row + j * D
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    if j < H + HKV:
        c = tl.load(cos_ptr + row * stride_cs + d).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_cs + d).to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if j < H:
            dst = q_ptr + ((b * H + j) * T + t) * D
        else:
            dst = kc_ptr + ((b * HKV + (j - H)) * TMAX + pos) * D
    else:
        o1 = x1
        o2 = x2
        dst = vc_ptr + ((b * HKV + (j - H - HKV)) * TMAX + pos) * D
    tl.store(dst + d, o1.to(q_ptr.dtype.element_ty))
    tl.store(dst + HALF + d, o2.to(q_ptr.dtype.element_ty))


def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rotate q and k of ``qkv`` (B, T, (H+2·Hkv)·D), write k and v into the caches (B, Hkv, Tmax, D) at
    positions ``pos[0] + t``; return q as (B, H, T, D)."""
    B, T, _ = qkv.shape
    qkv = qkv.contiguous()
    cos, sin = cos.reshape(B * T, -1).contiguous(), sin.reshape(B * T, -1).contiguous()
    q = torch.empty(B, heads, T, head_dim, dtype=qkv.dtype, device=qkv.device)
    grid = (B * T, heads + 2 * kv_heads)
    _rope_cache_kernel[grid](qkv, cos, sin, q, k_cache, v_cache, pos, T, heads, kv_heads, k_cache.shape[2],
                             qkv.stride(1), cos.stride(0), D=head_dim, HALF=head_dim // 2, **_pdl(qkv, warps=1))
    return q


@triton.jit
def silu_times(g, u, dt: tl.constexpr):
    """``silu(g) · u`` of gate and up values already in the model dtype ``dt``: fp32 arithmetic, the activation
    rounded to ``dt``, then the product (the rounding of :func:`silu_mul`, shared by every kernel that fuses it)."""
    g = g.to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return (a * u.to(tl.float32)).to(dt)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < I
    g = tl.load(gu_ptr + row * 2 * I + o, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * I + I + o, mask=m, other=0.0)
    tl.store(out_ptr + row * I + o, silu_times(g, u, out_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gate) · up`` for ``gu`` = [gate | up] along the last dimension."""
    I2 = gu.shape[-1]
    I = I2 // 2
    x = gu.contiguous()
    rows = x.numel() // I2
    out = torch.empty(*gu.shape[:-1], I, dtype=gu.dtype, device=gu.device)
    BLOCK = 1024
    _silu_mul_kernel[(rows, triton.cdiv(I, BLOCK))](x, out, I, BLOCK=BLOCK, **_pdl(x))
    return out
