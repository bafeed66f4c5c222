"""Decode attention over a static KV cache in one launch: split-KV (flash-decoding) with the rotary embedding
and the cache write of the new token folded in.

One query token per row (a decode step). The cache of each (row, KV head) is cut into chunks of ``CHUNK``
slots; one program per chunk computes the softmax partials of the ``G`` query heads that share the KV head
(GQA: ``G = H / Hkv`` query rows against one read of the chunk) over the slots it holds that are valid
(``pad[b] <= slot <= pos``; chunks past ``pos`` exit at once, so a step reads only the filled part of the
cache, not its static length). The program whose chunk holds ``pos`` also rotates and stores the new key and
value into the cache, and uses them from registers. The last program of a (row, KV head) to finish (an atomic
arrival counter, reset by that program, so the launch can be replayed from a CUDA graph) combines the partials
and writes the output in the model dtype.

Numerics: q and k are rotated in fp32 and rounded once to the model dtype, as the separate rotary kernel
(:func:`rankcut.kernels.glue.rope_cache`) does; scores, softmax statistics and the weighted sum of values are
fp32, with the probabilities rounded to the model dtype for the second product (as flash attention does).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rankcut.kernels.dispatch import pdl_enabled
from rankcut.kernels.plan import next_pow2

#: Programs a launch aims for at full cache length (about four per SM of an H100/H200: each program's chain of
#: dependent memory round trips, not bandwidth, sets a short chunk's time, so more programs run more at once).
TARGET_PROGRAMS = 528
#: Largest chunk (cache slots per program) and tile (slots per step of a program's loop).
MAX_CHUNK, MAX_BLOCK_N = 256, 64


@triton.jit
def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, pad_ptr, out_ptr,
                             part_ptr, stat_ptr, count_ptr,
                             H, HKV, TMAX, stride_row, stride_cs, scale,
                             SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                             D: tl.constexpr, HALF: tl.constexpr,
                             CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, HAS_PAD: tl.constexpr,
                             PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    bh = tl.program_id(0)  # b * HKV + kv head
    split = tl.program_id(1)
    b = bh // HKV
    kvh = bh - b * HKV
    pos = tl.load(pos_ptr)
    n_active = pos // CHUNK + 1  # chunks holding slots 0 .. pos
    if split < n_active:
        lo = 0
        if HAS_PAD:
            lo = tl.load(pad_ptr + b)
        g = tl.arange(0, GP)
        d = tl.arange(0, HALF)
        dv = tl.arange(0, D)
        gm = g < G
        row = qkv_ptr + b * stride_row
        # q of the G heads sharing this KV head, rotated; halves kept apart (rotate_half pairs d with d + D/2)
        q_off = (kvh * G + g)[:, None] * D + d[None, :]
        q1 = tl.load(row + q_off, mask=gm[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(row + q_off + HALF, mask=gm[:, None], other=0.0).to(tl.float32)
        k_src = row + (H + kvh) * D
        k1 = tl.load(k_src + d).to(tl.float32)
        k2 = tl.load(k_src + HALF + d).to(tl.float32)
        if ROPE:
            c = tl.load(cos_ptr + b * stride_cs + d).to(tl.float32)
            s = tl.load(sin_ptr + b * stride_cs + d).to(tl.float32)
            q1, q2 = q1 * c[None, :] - q2 * s[None, :], q2 * c[None, :] + q1 * s[None, :]
            k1, k2 = k1 * c - k2 * s, k2 * c + k1 * s
        dt = kc_ptr.dtype.element_ty
        q1 = q1.to(dt)
        q2 = q2.to(dt)
        k1 = k1.to(dt)
        k2 = k2.to(dt)
        v_new = tl.load(row + (H + HKV + kvh) * D + dv)
        cache = bh.to(tl.int64) * TMAX * D
        start = split * CHUNK
        if pos < start + CHUNK:  # this chunk holds the new token: write it to the cache
            tl.store(kc_ptr + cache + pos * D + d, k1)
            tl.store(kc_ptr + cache + pos * D + HALF + d, k2)
            tl.store(vc_ptr + cache + pos * D + dv, v_new)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        for i in range(0, CHUNK // BLOCK_N):  # tiles past pos are fully masked (no memory traffic)
            n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = (n >= lo) & (n <= pos)
            old = valid & (n < pos)  # slots already in the cache; the new one comes from registers
            kt = kc_ptr + cache + n[:, None] * D
            is_new = (n == pos)[:, None]
            kb1 = tl.where(is_new, k1[None, :], tl.load(kt + d[None, :], mask=old[:, None], other=0.0))
            kb2 = tl.where(is_new, k2[None, :], tl.load(kt + HALF + d[None, :], mask=old[:, None], other=0.0))
            vb = tl.where(is_new, v_new[None, :], tl.load(vc_ptr + cache + n[:, None] * D + dv[None, :],
                                                         mask=old[:, None], other=0.0))
            sc = tl.dot(q1, tl.trans(kb1)) + tl.dot(q2, tl.trans(kb2))
            sc = tl.where(valid[None, :], sc * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(sc - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), vb)
            m_i = m_new
        # partials of this chunk, real query rows only: acc at [bh, g, split, :], (m, l) at [bh, 0|1, g, split]
        tl.store(part_ptr + ((bh * G + g[:, None]) * SPLITS + split) * D + dv[None, :], acc, mask=gm[:, None])
        stat = stat_ptr + bh * 2 * G * SPLITS + g * SPLITS + split
        tl.store(stat, m_i, mask=gm)
        tl.store(stat + G * SPLITS, l_i, mask=gm)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
        if arrived == n_active - 1:  # the last chunk of this (row, KV head) to finish combines them all
            tl.debug_barrier()
            sp = tl.arange(0, SPLITS_P2)
            live = sp < n_active
            for j in tl.static_range(G):  # one query row at a time, all its splits in one load
                st = stat_ptr + bh * 2 * G * SPLITS + j * SPLITS + sp
                m_s = tl.load(st, mask=live, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(st + G * SPLITS, mask=live, other=0.0, cache_modifier=".cg")
                acc_s = tl.load(part_ptr + ((bh * G + j) * SPLITS + sp[:, None]) * D + dv[None, :], mask=live[:, None],
                                other=0.0, cache_modifier=".cg")
                m_all = tl.max(m_s, axis=0)
                m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
                w = tl.where(live, tl.exp2(m_s - m_all), 0.0)
                l_all = tl.sum(w * l_s, axis=0)
                o = tl.sum(w[:, None] * acc_s, axis=0) / tl.where(l_all == 0.0, 1.0, l_all)
                tl.store(out_ptr + b * H * D + (kvh * G + j) * D + dv, o.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(count_ptr + bh, 0)


def plan_chunk(batch: int, kv_heads: int, max_len: int) -> int:
    """Cache slots per program: enough programs at full length (:data:`TARGET_PROGRAMS`), 16 to
    :data:`MAX_CHUNK` slots."""
    want = batch * kv_heads * max_len / TARGET_PROGRAMS
    return int(min(MAX_CHUNK, max(16, next_pow2(max(1, math.ceil(want))))))


class DecodeAttention:
    """The kernel's scratch for one decoder (partials, statistics, arrival counters), shared by its layers
    (their launches are ordered on the stream), and its launch.

    Args:
        batch, heads, kv_heads, head_dim, max_len: the decoder's shapes (``head_dim`` a power of two ≥ 32).
        device: a CUDA device (or the CPU under ``TRITON_INTERPRET=1``, for tests).
        chunk: cache slots per program (a power of two ≥ 16; default :func:`plan_chunk`).
    """

    def __init__(self, batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int, device,
                 chunk: int | None = None) -> None:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads do not group onto {kv_heads} KV heads")
        if head_dim < 32 or head_dim & (head_dim - 1):
            raise ValueError(f"decode attention needs a power-of-two head_dim >= 32, got {head_dim}")
        self.batch, self.heads, self.kv_heads, self.head_dim, self.max_len = batch, heads, kv_heads, head_dim, max_len
        self.group = heads // kv_heads
        self.gp = max(16, next_pow2(self.group))
        self.chunk = plan_chunk(batch, kv_heads, max_len) if chunk is None else int(chunk)
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        self.block_n = min(self.chunk, MAX_BLOCK_N)
        self.splits = triton.cdiv(max_len, self.chunk)
        rows = batch * heads * self.splits
        self.part = torch.empty(rows * head_dim, dtype=torch.float32, device=device)
        self.stat = torch.empty(rows * 2, dtype=torch.float32, device=device)
        self.count = torch.zeros(batch * kv_heads, dtype=torch.int32, device=device)

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the one new token of each row.

        Args:
            qkv: (B, 1, (H + 2·Hkv)·D): q heads, then k heads, then v heads, unrotated.
            cos, sin: (B, 1, D) rotary tables at each row's position (None: no rotary embedding, as GPT-2).
            k_cache, v_cache: (B, Hkv, max_len, D); slot ``pos`` receives the new key and value.
            pos: (1,) int64 on the device, the new token's slot.
            pad: (B,) leading padding slots of each row, or None.

        Returns:
            (B, 1, H·D) in qkv's dtype.
        """
        B, T, width = qkv.shape
        H, HKV, D = self.heads, self.kv_heads, self.head_dim
        if T != 1 or B != self.batch or width != (H + 2 * HKV) * D:
            raise ValueError(f"decode attention expects qkv of shape ({self.batch}, 1, {(H + 2 * HKV) * D}), "
                             f"got {tuple(qkv.shape)}")
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        out = torch.empty(B, 1, H * D, dtype=qkv.dtype, device=qkv.device)
        rope = cos is not None
        if rope:
            cos, sin = cos.reshape(B, D), sin.reshape(B, D)
            if cos.stride(-1) != 1 or sin.stride() != cos.stride():
                cos, sin = cos.contiguous(), sin.contiguous()
        on = pdl_enabled(qkv.device)
        extra = {"launch_pdl": True} if on else {}
        _decode_attention_kernel[(B * HKV, self.splits)](
            qkv, cos if rope else qkv, sin if rope else qkv, k_cache, v_cache, pos, pad if pad is not None else pos,
            out, self.part, self.stat, self.count,
            H, HKV, self.max_len, qkv.stride(0), cos.stride(0) if rope else 0, D ** -0.5,
            SPLITS=self.splits, SPLITS_P2=next_pow2(self.splits), G=self.group, GP=self.gp, D=D, HALF=D // 2,
            CHUNK=self.chunk, BLOCK_N=self.block_n, ROPE=rope,
            HAS_PAD=pad is not None, PDL=on, num_warps=4, **extra)
        return out
