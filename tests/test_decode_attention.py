"""The one-launch split-KV decode attention (rotary + cache write + attention): equality with a float64
reference (GQA, padding, chunk edges, several tiles per chunk), CUDA-graph replays (the arrival counters reset
themselves), the decode step with it against the step with SDPA, and when it is (not) used."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import DecodeLoop
from rankcut.bench.models import random_lowrank_
from rankcut.kernels import ops
from tiny_models import llama
from interpreter import needs_triton, run_in_interpreter

ROOT = Path(__file__).resolve().parents[1]


def reference(qkv, cos, sin, kc, vc, pos, pad, H, HKV, D):
    """Float64 attention of the new token over slots pad[b]..pos; also the caches with the new key/value."""
    B = qkv.shape[0]
    q, k, v = qkv[:, 0].float().split([H * D, HKV * D, HKV * D], -1)
    q, k, v = q.view(B, H, D), k.view(B, HKV, D), v.view(B, HKV, D)
    if cos is not None:
        c, s = cos.view(B, 1, D).float(), sin.view(B, 1, D).float()

        def rot(x):
            return torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)

        q, k = (q * c + rot(q) * s).to(qkv.dtype).float(), (k * c + rot(k) * s).to(qkv.dtype)
    kc, vc = kc.clone(), vc.clone()
    kc[:, :, pos], vc[:, :, pos] = k.to(kc.dtype), v.to(vc.dtype)
    G = H // HKV
    keys, vals = kc.double().repeat_interleave(G, 1), vc.double().repeat_interleave(G, 1)
    scores = torch.einsum("bhd,bhnd->bhn", q.double(), keys) / math.sqrt(D)
    n = torch.arange(kc.shape[2], device=kc.device)
    lo = pad if pad is not None else torch.zeros(B, dtype=torch.long, device=kc.device)
    valid = (n[None, :] <= pos) & (n[None, :] >= lo[:, None])
    att = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhn,bhnd->bhd", att, vals).reshape(B, 1, H * D), kc, vc


def _case(B, H, HKV, D, T, dtype, device, rope=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * HKV) * D, generator=g, device=device).to(dtype)
    kc = torch.randn(B, HKV, T, D, generator=g, device=device).to(dtype)
    vc = torch.randn(B, HKV, T, D, generator=g, device=device).to(dtype)
    ang = torch.rand(B, 1, D // 2, generator=g, device=device) * 6.28
    ang = torch.cat([ang, ang], -1)
    cos, sin = (ang.cos().to(dtype), ang.sin().to(dtype)) if rope else (None, None)
    return qkv, cos, sin, kc, vc


# (B, H, HKV, D, cache, pos, chunk, pad, rope): MHA, GQA 4:1 and 8:1, the new token first / at a chunk's last and
# first slot / in a chunk of several tiles, a padded batch whose padding covers whole chunks, no rotary (GPT-2)
CASES = [
    (1, 4, 4, 32, 40, 0, None, None, True),
    (1, 4, 4, 32, 40, 15, 16, None, True),
    (2, 8, 2, 64, 100, 64, 16, [3, 40], True),
    (1, 16, 2, 64, 300, 257, 128, None, True),
    (3, 6, 6, 32, 64, 47, None, None, False),
    (1, 8, 1, 32, 130, 129, 16, None, True),  # MQA, 9 splits (a non-power-of-two count)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_kernel_matches_reference_on_gpu(case, dtype):
    from rankcut.kernels.attention import DecodeAttention

    B, H, HKV, D, T, pos, chunk, pad, rope = case
    qkv, cos, sin, kc, vc = _case(B, H, HKV, D, T, dtype, "cuda", rope)
    pad_t = torch.tensor(pad, device="cuda") if pad else None
    want, k_want, v_want = reference(qkv, cos, sin, kc, vc, pos, pad_t, H, HKV, D)
    att = DecodeAttention(B, H, HKV, D, T, "cuda", chunk=chunk)
    p = torch.tensor([pos], device="cuda")
    for _ in range(3):  # the counters must be back at zero after every call
        got = att(qkv, cos, sin, kc, vc, p, pad_t)
        assert att.count.abs().sum().item() == 0
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert (got.double() - want).abs().max().item() < tol
    assert torch.equal(vc, v_want)
    # the key is rotated in fp32 and rounded once: at most one unit in the last place from the reference
    assert (kc.float() - k_want.float()).abs().max().item() <= 2 * torch.finfo(dtype).eps * k_want.float().abs().max().item()


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph_at_moving_positions():
    from rankcut.bench.loop import capture
    from rankcut.kernels.attention import DecodeAttention

    B, H, HKV, D, T = 2, 8, 2, 64, 96
    qkv, cos, sin, kc, vc = _case(B, H, HKV, D, T, torch.bfloat16, "cuda")
    start_k, start_v = kc.clone(), vc.clone()
    att = DecodeAttention(B, H, HKV, D, T, "cuda", chunk=16)
    pos = torch.tensor([10], device="cuda")
    out = torch.empty(B, 1, H * D, dtype=torch.bfloat16, device="cuda")

    def step():
        out.copy_(att(qkv, cos, sin, kc, vc, pos))
        pos.add_(1)

    graph = capture(step, warmup=1)
    kc.copy_(start_k), vc.copy_(start_v)
    pos.fill_(10)
    ref_k, ref_v = start_k.clone(), start_v.clone()
    for p in range(10, 40):  # crosses chunk edges at 16 and 32
        graph.replay()
        want, ref_k, ref_v = reference(qkv, cos, sin, ref_k, ref_v, p, None, H, HKV, D)
        assert (out.double() - want).abs().max().item() < 2e-2, p
    assert att.count.abs().sum().item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("build", [
    lambda: llama(head_dim=32),
    lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2,
                                                                 n_head=2, n_inner=128)).eval(),
], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_decode_step_with_split_kv_equals_sdpa_step_on_gpu(build, lowrank):
    model = build().to("cuda", torch.bfloat16)
    if lowrank:
        random_lowrank_(model, 0.5)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen).cuda()
    forced = torch.randint(0, model.config.vocab_size, (6, 2, 1), generator=gen).cuda()
    logits = {}
    for mode in ("auto", "sdpa"):
        dec = make_decoder(model, batch=2, max_len=40, attention=mode)
        assert (dec.decode_attn is not None) == (mode == "auto")
        with torch.no_grad():
            pos = torch.zeros(1, dtype=torch.long, device="cuda")
            dec.forward(prompt, pos)
            steps = []
            for t in range(6):  # one-token steps over a growing cache, the same tokens for both
                pos.fill_(7 + t)
                steps.append(dec.forward(forced[t], pos).float())
            logits[mode] = torch.stack(steps)
            if mode == "auto":  # replayed from a CUDA graph, the kernel gives what it gives eagerly
                runs = []
                for graph in (False, True):
                    loop = DecodeLoop(dec, prompt, 24, use_graph=graph)
                    loop.prefill()
                    loop.run_steps()
                    runs.append(loop.tokens.tolist())
                assert runs[0] == runs[1]
        dec.release()
    a, b = logits["auto"], logits["sdpa"]
    assert float((a - b).norm() / b.norm()) < 1e-2


def test_not_used_on_the_cpu_and_bad_mode():
    model = llama(head_dim=32)
    dec = make_decoder(model, batch=1, max_len=20)
    assert dec.decode_attn is None  # the CPU keeps the eager rotary + SDPA (equal to Hugging Face's forward)
    assert dec.kv_read_bytes(8, 4) == dec.kv_bytes()
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa"):
        make_decoder(model, batch=1, max_len=20, attention="flash")
    assert ops.decode_attention(1, 4, 2, 16, 20, torch.device("cpu"), torch.bfloat16) is None


def test_filled_slot_accounting():
    """With the kernel a step reads the filled slots only: prompt + (new - 1) / 2 + 1 of them on average."""
    model = llama(head_dim=32)
    dec = make_decoder(model, batch=1, max_len=20)
    dec.decode_attn = object()  # as on CUDA
    assert dec.kv_read_bytes(8, 12) == pytest.approx(dec.kv_bytes() * (8 + 5.5 + 1) / 20)
    assert dec.kv_read_bytes(19, 1) == dec.kv_bytes()


def test_chunk_plan_and_bad_shapes():
    pytest.importorskip("triton")
    from rankcut.kernels.attention import DecodeAttention, plan_chunk

    assert plan_chunk(1, 32, 384) == 32 and plan_chunk(1, 8, 384) == 16 and plan_chunk(1, 32, 65536) == 256
    with pytest.raises(ValueError, match="power-of-two head_dim >= 32"):
        DecodeAttention(1, 4, 2, 24, 16, "cpu")
    with pytest.raises(ValueError, match="power-of-two head_dim >= 32"):
        DecodeAttention(1, 4, 2, 16, 16, "cpu")
    with pytest.raises(ValueError, match="do not group"):
        DecodeAttention(1, 6, 4, 32, 16, "cpu")
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        DecodeAttention(1, 4, 4, 32, 16, "cpu", chunk=24)


@needs_triton
def test_kernel_in_the_triton_interpreter():
    """The kernel's logic on the CPU (Triton's interpreter, float16: the interpreter's bfloat16 dot is not exact)."""
    run_in_interpreter(f"""
        import sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        from test_decode_attention import CASES, _case, reference
        from rankcut.kernels.attention import DecodeAttention
        for B, H, HKV, D, T, pos, chunk, pad, rope in CASES:
            qkv, cos, sin, kc, vc = _case(B, H, HKV, D, T, torch.float16, "cpu", rope)
            pad_t = torch.tensor(pad) if pad else None
            want, k_want, v_want = reference(qkv, cos, sin, kc, vc, pos, pad_t, H, HKV, D)
            att = DecodeAttention(B, H, HKV, D, T, "cpu", chunk=chunk)
            got = att(qkv, cos, sin, kc, vc, torch.tensor([pos]), pad_t)
            err = (got.double() - want).abs().max().item()
            assert err < 3e-3, (B, H, HKV, pos, err)
            assert torch.equal(vc, v_want) and att.count.abs().sum().item() == 0
        print("ok")
    """)
