"""rankcut's own decode step over a Hugging Face model's modules and weights, with a static KV cache.

Hugging Face's eager ``generate`` is launch-bound, and its static-cache compile path re-records CUDA graphs
every step (DESIGN.md §5), so the benchmark owns its step: a KV cache it allocates once, positions held in
a device tensor, no host synchronisation and no shape change from one token to the next, so that one step
can be captured in a CUDA graph and replayed. The step calls the model's own modules (embeddings, norms,
projections, LM head), so dense and compressed models run the identical code; only the projection
layers differ (``nn.Linear`` / ``Conv1D`` or :class:`~rankcut.modules.LowRankLinear`).

A one-token step on CUDA runs its attention as one launch (:mod:`rankcut.kernels.attention`): the rotary
embedding of q and k, the write of the new key and value into the cache, and a split-KV attention over the
filled slots only; ``attention="sdpa"`` (and every prompt, and the CPU) keeps the rotary kernel, the cache
write and ``F.scaled_dot_product_attention`` over the whole static cache with a mask.

Projections that read the same input are fused at construction (``fuse=True``; q/k/v and gate/up, dense
or low-rank alike; :mod:`rankcut.kernels.grouped`). Supported: the Llama family (``llama``, ``mistral``,
``qwen2``: RMSNorm, rotary, GQA, SiLU-gated MLP) and GPT-2.

A batch of prompts of different lengths (:mod:`rankcut.bench.generate`) is left-padded: every row shares the cache
slots ``pos[0] + t``, and ``pad`` (B,) says how many leading slots of each row are padding. Row b's token in
slot j then sits at position ``j - pad[b]`` (rotary / position embedding) and attends to slots
``pad[b] .. j`` only: what Hugging Face ``generate`` computes from a left-padded batch and its attention
mask. Without ``pad`` (the benchmark) every row is a full-length sequence, and the step is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rankcut.kernels import dispatch, ops
from rankcut.modules.grouped import SeparateGroup, make_group

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


class _Decoder:
    """Shared state: the model, a static KV cache for ``batch`` × ``max_len``, index buffers."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, kv_heads: int, head_dim: int, layers: int,
                 heads: int, attention: str = "auto", dense_gemv: bool = True) -> None:
        self.model = model
        self.dense_gemv = dense_gemv  # one-token dense projections through rankcut's GEMV (False: cuBLAS)
        p = next(model.parameters())
        self.device, self.dtype, self.batch, self.max_len = p.device, p.dtype, batch, max_len
        shape = (batch, kv_heads, max_len, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(layers)]
        self.arange = torch.arange(max_len, device=p.device)
        self.groups: list[nn.Module] = []
        # one-token steps on CUDA: rotary + cache write + split-KV attention in one launch (None: the eager ops)
        self.decode_attn = ops.decode_attention(batch, heads, kv_heads, head_dim, max_len, p.device, p.dtype, attention)

    def kv_bytes(self) -> int:
        """Bytes of the KV cache (its static length)."""
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def kv_read_bytes(self, prompt_len: int, new_tokens: int) -> float:
        """KV-cache bytes a decode step reads, averaged over the ``new_tokens`` steps after a ``prompt_len``
        prefill: the filled slots (``pos + 1``) with the split-KV kernel, the whole static cache with SDPA."""
        if self.decode_attn is None:
            return float(self.kv_bytes())
        filled = prompt_len + (new_tokens - 1) / 2 + 1
        return self.kv_bytes() * min(1.0, filled / self.max_len)

    def _mask(self, positions: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Additive attention mask: 0 where key slot ≤ query slot, else the dtype's minimum; (1, 1, T, max_len).

        With ``pad`` (B,): (B, 1, T, max_len), also masking each row's ``pad[b]`` leading slots; a padding
        query sees itself only, so that no row of the softmax is empty (its output is never read)."""
        keys = self.arange[None, :]
        allowed = keys <= positions[:, None]
        if pad is not None:
            allowed = (allowed & (keys >= pad[:, None, None])) | (keys == positions[:, None])
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        mask = torch.where(allowed, zero, torch.finfo(self.dtype).min)
        return mask[None, None] if pad is None else mask[:, None]

    @staticmethod
    def _row_positions(positions: torch.Tensor, pad: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Position (B, T) of each row's tokens: the slot, less the row's padding (padding slots get 0)."""
        if pad is None:
            return positions[None].expand(batch, -1)
        return (positions[None, :] - pad[:, None]).clamp(min=0)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) of the last of the T tokens ``ids`` (B, T) placed in cache slots ``pos[0]`` + t
        (each row's first ``pad[b]`` slots being left padding, when given)."""
        with dispatch.dense_kernel(self.dense_gemv):
            return self._step(ids, pos, pad)

    def unfuse(self) -> None:
        """Give the layers back their own parameter storage (e.g. before saving the model)."""
        for g in self.groups:
            g.unshare()

    def release(self) -> None:
        """Unfuse and drop the groups and the cache: the decoder is not usable afterwards. Each group is dropped
        as soon as its layers own their storage again, so memory peaks at one group's weights above the model."""
        groups, self.groups = self.groups, []
        for name in ("qkv", "gate_up"):
            if hasattr(self, name):
                setattr(self, name, [])
        self.k_cache, self.v_cache, self.decode_attn = [], [], None
        while groups:
            groups.pop().unshare()

    def _attend(self, q: torch.Tensor, i: int, mask: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
        """Attention of q (B, H, T, D) over the whole static cache of layer i; returns (B, T, H·D)."""
        B, H, T, D = q.shape
        k, v = self.k_cache[i], self.v_cache[i]
        group = heads // kv_heads
        if T == 1:  # the `group` query heads of one KV head act as `group` query rows: no repeat of K/V
            out = F.scaled_dot_product_attention(q.reshape(B, kv_heads, group, D), k, v, attn_mask=mask)
            return out.reshape(B, 1, H * D)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, H * D)


class LlamaDecoder(_Decoder):
    """Decode step for ``LlamaForCausalLM``-like models (Llama, Mistral, Qwen2)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, fuse: bool = True, attention: str = "auto",
                 fold: bool = False, dense_gemv: bool = True) -> None:
        cfg = model.config
        self.fold = fold
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.inner = model.model
        self.layers = list(self.inner.layers)
        super().__init__(model, batch, max_len, self.kv_heads, self.head_dim, len(self.layers), self.heads, attention,
                         dense_gemv)
        build = make_group if fuse else SeparateGroup
        self.qkv = [build([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in self.layers]
        self.gate_up = [build([l.mlp.gate_proj, l.mlp.up_proj]) for l in self.layers]
        self.groups = self.qkv + self.gate_up
        self.silu = getattr(cfg, "hidden_act", "silu") == "silu"

    def _step(self, ids: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        B, T = ids.shape
        positions = pos + self.arange[:T]
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, self._row_positions(positions, pad, B))
        split_kv = T == 1 and self.decode_attn is not None  # one-token step: the split-KV kernel
        mask = None if split_kv else self._mask(positions, pad)
        res = None
        fold = self.fold and B * T == 1
        for i, layer in enumerate(self.layers):
            qkv, res = ops.norm_project(self.qkv[i], h, res, layer.input_layernorm, fold)
            if split_kv:
                a = self.decode_attn(qkv, cos, sin, self.k_cache[i], self.v_cache[i], pos, pad)
            else:
                q = ops.rope_cache(qkv, cos, sin, self.k_cache[i], self.v_cache[i], pos, positions,
                                   self.heads, self.kv_heads, self.head_dim)
                a = self._attend(q, i, mask, self.heads, self.kv_heads)
            o = ops.project(layer.self_attn.o_proj, a)
            if fold:  # add + RMSNorm in gate/up's phase 1, SiLU·up in down's phase 1
                gu, res = ops.norm_project(self.gate_up[i], o, res, layer.post_attention_layernorm, fold)
                h = ops.gated_project(layer.mlp.down_proj, gu, layer.mlp.act_fn, self.silu, fold)
            else:  # SiLU·up in the dense gate/up GEMV's epilogue where that applies
                x, res = ops.add_rmsnorm(o, res, layer.post_attention_layernorm)
                h = ops.project(layer.mlp.down_proj, ops.glu_project(self.gate_up[i], x, layer.mlp.act_fn, self.silu))
        x, _ = ops.add_rmsnorm(h, res, self.inner.norm)
        return ops.project(self.model.lm_head, x[:, -1, :])


class GPT2Decoder(_Decoder):
    """Decode step for ``GPT2LMHeadModel`` (``c_attn`` is already one fused projection)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, fuse: bool = True, attention: str = "auto",
                 fold: bool = False, dense_gemv: bool = True) -> None:
        cfg = model.config
        del fold  # nothing to fold yet: GPT-2's LayerNorm and GELU keep their own kernels
        self.heads, self.embed = cfg.n_head, cfg.n_embd
        self.head_dim = self.embed // self.heads
        self.tr = model.transformer
        self.blocks = list(self.tr.h)
        super().__init__(model, batch, max_len, self.heads, self.head_dim, len(self.blocks), self.heads, attention,
                         dense_gemv)
        self.tanh_gelu = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")

    def _step(self, ids: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        B, T = ids.shape
        positions = pos + self.arange[:T]
        wpe = self.tr.wpe(positions)[None] if pad is None else self.tr.wpe(self._row_positions(positions, pad, B))
        h = self.tr.wte(ids) + wpe
        split_kv = T == 1 and self.decode_attn is not None  # one-token step: the split-KV kernel
        mask = None if split_kv else self._mask(positions, pad)
        E, H, D = self.embed, self.heads, self.head_dim
        for i, blk in enumerate(self.blocks):
            qkv = blk.attn.c_attn(blk.ln_1(h))
            if split_kv:
                a = self.decode_attn(qkv, None, None, self.k_cache[i], self.v_cache[i], pos, pad)
            else:
                q, k, v = qkv.split(E, dim=-1)
                q = q.view(B, T, H, D).transpose(1, 2)
                self.k_cache[i].index_copy_(2, positions, k.view(B, T, H, D).transpose(1, 2))
                self.v_cache[i].index_copy_(2, positions, v.view(B, T, H, D).transpose(1, 2))
                a = self._attend(q, i, mask, H, H)
            h = h + blk.attn.c_proj(a)
            m = blk.mlp.c_fc(blk.ln_2(h))
            m = ops.gelu_tanh(m) if self.tanh_gelu else blk.mlp.act(m)
            h = h + blk.mlp.c_proj(m)
        return ops.project(self.model.lm_head, self.tr.ln_f(h)[:, -1, :])


def attention_window(model: nn.Module) -> int | None:
    """The sliding-window length of ``model``'s attention (Mistral's ``sliding_window``; Qwen2's when
    ``use_sliding_window``), or None when every token attends to all before it."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "model_type", "") == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        return None
    return int(window) if window else None


def check_supported(model: nn.Module, max_len: int | None = None) -> None:
    """Raise ValueError unless rankcut's decode step supports ``model``'s architecture (and, given ``max_len``,
    sequences of that many positions: the step attends to the whole cache, so a sliding-window model runs only
    while prompt + new tokens fit in its window)."""
    kind = getattr(getattr(model, "config", None), "model_type", "")
    if kind in LLAMA_FAMILY:
        if hasattr(model.model.layers[0].self_attn, "q_norm"):
            raise ValueError(f"{type(model).__name__}: rankcut's decode step does not support attention with q/k norms")
        window = attention_window(model)
        if window is not None and max_len is not None and max_len > window:
            raise ValueError(f"{type(model).__name__} attends within a sliding window of {window} positions; rankcut's "
                             f"decode step attends to the whole cache, so it supports at most {window} positions "
                             f"(prompt + new tokens), not {max_len}")
        return
    if kind != "gpt2":
        raise ValueError(f"rankcut's decode step supports the Llama family ({', '.join(LLAMA_FAMILY)}) and GPT-2, "
                         f"not model_type {kind!r}")


def make_decoder(model: nn.Module, batch: int, max_len: int, fuse: bool = True, attention: str = "auto",
                 fold: bool = False, dense_gemv: bool = True) -> _Decoder:
    """The decode step for ``model``; ``attention`` is ``"auto"`` (one-token steps on CUDA use the split-KV
    kernel, :mod:`rankcut.kernels.attention`) or ``"sdpa"`` (rotary kernel, cache write, then
    ``F.scaled_dot_product_attention`` over the whole static cache). ``fold`` (Llama family, one row, low-rank
    projections on the GEMV kernel): add + RMSNorm and SiLU·up computed inside the next projection's phase 1
    (:mod:`rankcut.kernels.folds`) instead of their own kernels; off by default: measured no faster (BENCHMARKS.md).
    ``dense_gemv``: one-token dense projections (``nn.Linear``, fused dense groups) through rankcut's GEMV
    (:mod:`rankcut.kernels.gemv`) instead of cuBLAS.

    Raises:
        ValueError: an architecture the decode step does not support, or a sliding window shorter than
            ``max_len`` (:func:`check_supported`).
    """
    check_supported(model, max_len)
    cls = GPT2Decoder if model.config.model_type == "gpt2" else LlamaDecoder
    return cls(model, batch, max_len, fuse, attention, fold, dense_gemv)
