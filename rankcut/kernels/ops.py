"""Decode-step operations with a Triton path on CUDA and an eager path everywhere else.

Used by the decode benchmark (:mod:`rankcut.bench.decode`) identically for dense and compressed models.
The eager paths call the Hugging Face modules themselves, so on the CPU the decode step computes what the
model's own forward computes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rankcut.kernels.dispatch import KERNEL_DTYPES, dense_forward, enabled, glu_forward, triton_available

#: Decode attention: ``auto`` (the split-KV kernel where it applies), ``sdpa`` (rotary kernel + SDPA).
ATTENTION_MODES = ("auto", "sdpa")
#: RMSNorm classes whose forward is ``weight * (x / rms(x)).to(dtype)`` with fp32 statistics.
STANDARD_RMSNORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def _fast_on(device: torch.device | str, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cuda" and enabled() and triton_available() and dtype in KERNEL_DTYPES


def _fast(t: torch.Tensor) -> bool:
    return _fast_on(t.device, t.dtype)


def check_attention_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`ATTENTION_MODES`."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")


def add_rmsnorm(h: torch.Tensor, res: torch.Tensor | None, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(norm(s), s)`` with ``s = res + h`` (``s = h`` when ``res`` is None)."""
    if _fast(h) and type(norm).__name__ in STANDARD_RMSNORMS:
        from rankcut.kernels import glue

        return glue.add_rmsnorm(h, res, norm.weight, float(norm.variance_epsilon))
    s = h if res is None else res + h
    return norm(s), s


def project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``proj(x)``; a plain ``nn.Linear`` on one CUDA token runs through the dense GEMV
    (:func:`rankcut.kernels.dispatch.dense_forward`) where that applies."""
    if type(proj) is nn.Linear and _fast(x):
        y = dense_forward(proj.weight, proj.bias, x)
        if y is not None:
            return y
    return proj(x)


def norm_project(proj: nn.Module, h: torch.Tensor, res: torch.Tensor | None, norm: nn.Module,
                 fold: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(proj(norm(s)), s)`` with ``s = res + h``: with ``fold``, the add and the norm inside ``proj``'s phase 1
    where that applies (:func:`rankcut.kernels.folds.norm_project`), else :func:`add_rmsnorm` then ``proj``."""
    if fold and _fast(h) and type(norm).__name__ in STANDARD_RMSNORMS:
        from rankcut.kernels import folds

        out = folds.norm_project(proj, h, res, norm.weight, float(norm.variance_epsilon))
        if out is not None:
            return out
    x, s = add_rmsnorm(h, res, norm)
    return project(proj, x), s


def gated_project(proj: nn.Module, gu: torch.Tensor, act: nn.Module, silu: bool, fold: bool = False) -> torch.Tensor:
    """``proj(act(gate) · up)`` for ``gu`` = [gate | up]: with ``fold`` (and SiLU), the product inside ``proj``'s
    phase 1 where that applies (:func:`rankcut.kernels.folds.gated_project`), else :func:`silu_mul` then ``proj``."""
    if fold and silu and _fast(gu):
        from rankcut.kernels import folds

        y = folds.gated_project(proj, gu)
        if y is not None:
            return y
    return project(proj, silu_mul(gu, act, silu))


def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rotary embedding of q and k from the fused ``qkv`` (B, T, (H+2·Hkv)·D), k and v written into the
    static caches at ``positions`` (= ``pos[0] + arange(T)``); returns q as (B, H, T, D)."""
    if _fast(qkv) and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0:
        from rankcut.kernels import glue

        return glue.rope_cache(qkv, cos, sin, k_cache, v_cache, pos, heads, kv_heads, head_dim)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, T, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(B, T, heads, head_dim).transpose(1, 2)
    k = k.view(B, T, kv_heads, head_dim).transpose(1, 2)
    v = v.view(B, T, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache.index_copy_(2, positions, k)
    v_cache.index_copy_(2, positions, v)
    return q


def decode_attention(batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int, device: torch.device,
                     dtype: torch.dtype, mode: str = "auto"):
    """The one-launch split-KV decode attention (:class:`rankcut.kernels.attention.DecodeAttention`) for a
    decoder of these shapes, or None where the decoder keeps rotary + cache write + SDPA (``mode="sdpa"``; a
    CPU device, another dtype, kernels off, no Triton, a head_dim that is not a power of two ≥ 32)."""
    check_attention_mode(mode)
    if mode == "sdpa" or not _fast_on(device, dtype) or head_dim < 32 or head_dim & (head_dim - 1) or heads % kv_heads:
        return None
    from rankcut.kernels.attention import DecodeAttention

    return DecodeAttention(batch, heads, kv_heads, head_dim, max_len, device)


def glu_project(group: nn.Module, x: torch.Tensor, act: nn.Module, silu: bool) -> torch.Tensor:
    """``act(gate) · up`` of a fused [gate, up] ``group`` on ``x``: for a dense group on one CUDA token with SiLU,
    the product in the GEMV's epilogue (:func:`rankcut.kernels.dispatch.glu_forward`: one launch fewer, the
    (1, 2I) pair never stored); else the group's forward, then :func:`silu_mul`."""
    if silu and _fast(x):
        y = glu_forward(group, x)
        if y is not None:
            return y
    return silu_mul(group(x), act, silu)


def silu_mul(gu: torch.Tensor, act: nn.Module, silu: bool) -> torch.Tensor:
    """``act(gate) · up`` for ``gu`` = [gate | up]; the Triton path when ``act`` is SiLU."""
    if silu and _fast(gu):
        from rankcut.kernels import glue

        return glue.silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    return act(gate) * up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new`` (the tanh approximation) in one kernel."""
    return F.gelu(x, approximate="tanh")
