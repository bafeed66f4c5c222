"""SiLU·up in the gate/up group's last kernel (rankcut.kernels.glu): the low-rank GLU phase 2 and the dense GLU
GEMV against a float64 reference that rounds as the unfused path does (Triton's interpreter on the CPU, float16;
bf16 on the GPU, where they also equal the unfused kernels), the cases the dispatch declines, and the decode step
with the epilogue on and off."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from rankcut.kernels import dispatch, ops
from rankcut.modules import LowRankLinear
from rankcut.modules.grouped import DenseGroup, LowRankGroup

ROOT = Path(__file__).resolve().parents[1]


def glu_reference(g: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) · up from float64 projection outputs, each rounded to ``dtype`` first, as the unfused path stores
    them."""
    g, u = g.to(dtype).double(), u.to(dtype).double()
    return (torch.nn.functional.silu(g).to(dtype).double() * u).to(dtype)


CHECK = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from test_glu import glu_reference
from rankcut.kernels.glu import glu_gemv, glu_phase2
from rankcut.kernels.lowrank import Scratch
from rankcut.kernels.plan import plan_dense, plan_lowrank
torch.manual_seed(0)
dt = torch.float16
# low-rank: (I, K, ranks, plan overrides, bias): one tile per rank; rank chunks (single_tile off); equal ranks
# (split-K phase 1 loops over its zeroing in a way the interpreter cannot run: the GPU tests take it)
for I, K, (rg, ru), kw, bias in [(48, 64, (24, 40), {{"block_n": 4}}, False),
                                  (33, 96, (40, 24), {{"block_n": 2, "block_rk": 16, "single_tile": False}}, True),
                                  (40, 256, (16, 16), {{"block_n": 8, "split_k": 1}}, True)]:
    V = (torch.randn(rg + ru, K) / 8).to(dt)
    Ug, Uu = (torch.randn(I, rg) / 4).to(dt), (torch.randn(I, ru) / 4).to(dt)
    b = (torch.randn(2 * I) / 4).to(dt) if bias else None
    x = torch.randn(1, K).to(dt)
    plan = plan_lowrank(1, K, [rg, ru], [I, I], 4, pdl=False, **kw)
    assert not plan.split and (plan.block_rk < max(rg, ru)) == ("single_tile" in kw)
    scratch = Scratch(torch.device("cpu"), rg + ru, [rg, ru], [I, I])
    for rep in range(2):
        y = torch.empty(1, I, dtype=dt)
        glu_phase2(x, V, torch.cat([Ug.reshape(-1), Uu.reshape(-1)]), b, y, scratch, plan)
        t = x.double() @ V.double().T
        g = t[:, :rg] @ Ug.double().T + (b[:I].double() if bias else 0)
        u = t[:, rg:] @ Uu.double().T + (b[I:].double() if bias else 0)
        want = glu_reference(g, u, dt)
        err = (y.double() - want.double()).abs().max().item()
        assert err <= 4e-3 * want.double().abs().max().item(), (I, K, kw, rep, err)
# dense: (I, K, plan overrides, bias): the whole row in one tile; tiles along K
for I, K, kw, bias in [(40, 256, {{}}, False), (37, 640, {{"block_k": 128}}, True), (12, 300, {{"block_r": 4, "block_k": 64}}, True)]:
    W = (torch.randn(2 * I, K) / 16).to(dt)
    b = (torch.randn(2 * I) / 4).to(dt) if bias else None
    x = torch.randn(1, K).to(dt)
    y = torch.empty(1, I, dtype=dt)
    glu_gemv(x, W, b, y, plan_dense(2 * I, K, pdl=False, **kw))
    full = x.double() @ W.double().T + (b.double() if bias else 0)
    want = glu_reference(full[:, :I], full[:, I:], dt)
    err = (y.double() - want.double()).abs().max().item()
    assert err <= 4e-3 * want.double().abs().max().item(), (I, K, kw, err)
try:
    glu_gemv(x, W[:-1].contiguous(), None, y, plan_dense(2 * I - 1, K, pdl=False))
except ValueError as e:
    assert "even number of rows" in str(e)
else:
    raise AssertionError("odd [gate; up] weight accepted")
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_glu_kernels_in_the_triton_interpreter():
    script = textwrap.dedent(CHECK.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def _lowrank_group(k: int, n: int, ranks, device="cpu", dtype=torch.float32, bias=False) -> LowRankGroup:
    torch.manual_seed(0)
    layers = [LowRankLinear(k, n, r, bias=bias, dtype=dtype).to(device) for r in ranks]
    for l in layers:
        nn.init.normal_(l.V.weight, std=k ** -0.5)
        nn.init.normal_(l.U.weight, std=r ** -0.5 if (r := l.rank) else 1.0)
    return LowRankGroup(layers)


def test_glu_project_on_the_cpu_is_the_unfused_path_bit_for_bit():
    x = torch.randn(1, 1, 32)
    act = nn.SiLU()
    g = _lowrank_group(32, 48, (8, 12))
    with torch.no_grad():
        gu = g(x)
        assert torch.equal(ops.glu_project(g, x, act, True), act(gu[..., :48]) * gu[..., 48:])
        assert dispatch.glu_forward(g, x) is None  # a CPU input: the group's own forward
        d = DenseGroup([nn.Linear(32, 48), nn.Linear(32, 48)])
        gu = d(x)
        assert torch.equal(ops.glu_project(d, x, act, True), act(gu[..., :48]) * gu[..., 48:])
        gelu = nn.GELU()  # another activation: the product of the module's own activation
        assert torch.equal(ops.glu_project(d, x, gelu, False), gelu(gu[..., :48]) * gu[..., 48:])


def test_glu_forward_declines_groups_it_does_not_compute():
    x = torch.randn(1, 32)
    three = DenseGroup([nn.Linear(32, 16)] * 3)
    unequal = DenseGroup([nn.Linear(32, 16), nn.Linear(32, 24)])
    for group in (three, unequal, nn.Linear(32, 16)):
        assert dispatch.glu_forward(group, x) is None
    with dispatch.glu_kernel(False):
        assert dispatch._STATE["glu"] == "0"
    assert dispatch._STATE["glu"] == "dense"  # the default: dense groups only
    with pytest.raises(ValueError, match="glu mode must be one of"):
        with dispatch.glu_kernel("sometimes"):
            pass
    with dispatch.glu_kernel("dense"):
        dispatch._STATE["glu"] = "typo"  # as a bad RANKCUT_GLU would set it
        with pytest.raises(ValueError, match="RANKCUT_GLU must be one of"):
            dispatch.glu_forward(unequal, x)


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [(32, 48), (1500, 1500), (2100, 700)], ids=["small", "keep05", "chunks"])
def test_lowrank_glu_equals_the_unfused_kernels_on_gpu(ranks):
    n, k = (1536, 8192) if max(ranks) < 1000 else (4096, 1024)
    g = _lowrank_group(k, n, ranks, "cuda", torch.bfloat16, bias=True)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    plan = dispatch.get_plan(1, k, list(ranks), [n, n], x.device)
    assert plan.split == (ranks == (32, 48))  # few rows of V: split-K phase 1, whose epoch each call advances
    with torch.no_grad():
        assert dispatch.glu_forward(g, x) is None  # low-rank groups take the epilogue only with RANKCUT_GLU=all
        with dispatch.glu_kernel("all"):
            got = dispatch.glu_forward(g, x)
            assert got is not None and got.shape == (1, 1, n)
            assert torch.equal(dispatch.glu_forward(g, x), got)  # again: the split-K halves were left zeroed
        with dispatch.glu_kernel(False):
            assert dispatch.glu_forward(g, x) is None
            want = ops.silu_mul(g(x), nn.SiLU(), True)  # the group's kernels, then the SiLU·up kernel
        t = x.double() @ g.V_cat.double().T
        parts = [t[..., :ranks[0]] @ g.layers[0].U.weight.double().T, t[..., ranks[0]:] @ g.layers[1].U.weight.double().T]
        ref = glu_reference(parts[0] + g.bias_cat[:n].double(), parts[1] + g.bias_cat[n:].double(), torch.bfloat16)
    scale = float(ref.double().abs().max())
    assert float((got.double() - ref.double()).abs().max()) <= 2e-2 * scale
    assert float((got.double() - want.double()).abs().max()) <= 1e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(11008, 4096), (1536, 11008)])
def test_dense_glu_equals_the_dense_gemv_and_silu_on_gpu(shape):
    n, k = shape
    torch.manual_seed(0)
    d = DenseGroup([nn.Linear(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)])
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = dispatch.glu_forward(d, x)
        with dispatch.glu_kernel(False):
            want = ops.silu_mul(d(x), nn.SiLU(), True)
        with dispatch.dense_kernel(False):
            assert dispatch.glu_forward(d, x) is None  # --dense-gemv cublas keeps cuBLAS for the pair
    assert got is not None
    # same tiles and reduction order as the dense GEMV: the same bits
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("lowrank", [False, True], ids=["dense", "lowrank"])
def test_decode_step_with_the_glu_epilogue_on_gpu(lowrank):
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from rankcut.bench.decode import make_decoder
    from rankcut.bench.models import random_lowrank_

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
    if lowrank:
        random_lowrank_(model, 0.5)
    ids = torch.randint(0, 2048, (1, 1), device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    out = {}
    for on in (True, False):
        dec = make_decoder(model, 1, 16)
        with torch.no_grad(), dispatch.glu_kernel("all" if on else "0"), profile(activities=[ProfilerActivity.CUDA]) as prof:
            out[on] = dec.forward(ids, pos).float()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert any(("_p2_glu" if lowrank else "_dense_glu") in n for n in names) == on
        assert any("_silu_mul_kernel" in n for n in names) == (not on)
        dec.release()
    assert float((out[True] - out[False]).abs().max()) <= 2e-2 * float(out[False].abs().max())
    dec = make_decoder(model, 1, 16)  # the default mode: the epilogue for dense groups only
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.forward(ids, pos)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("_dense_glu" in n for n in names) == (not lowrank) and not any("_p2_glu" in n for n in names)
    dec.release()
