"""SiLU·up as the dense gate/up GEMV's epilogue (rankcut.kernels.glu): the kernel against a float64 reference that
rounds as the unfused path does (Triton's interpreter on the CPU, float16), bit-equality with the dense GEMV +
SiLU·up kernels on the GPU, the groups the dispatch declines (low-rank ones among them), and the decode step with
the epilogue on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rankcut.kernels import dispatch, ops
from rankcut.modules import LowRankLinear
from rankcut.modules.grouped import DenseGroup, LowRankGroup
from interpreter import needs_triton, run_in_interpreter

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
from rankcut.kernels.glu import glu_gemv
from rankcut.kernels.plan import plan_dense
torch.manual_seed(0)
dt = torch.float16
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


@needs_triton
def test_glu_kernels_in_the_triton_interpreter():
    run_in_interpreter(CHECK.format(root=str(ROOT), tests=str(ROOT / "tests")), timeout=900)


def _lowrank_group(k: int, n: int, ranks) -> LowRankGroup:
    torch.manual_seed(0)
    layers = [LowRankLinear(k, n, r) for r in ranks]
    for l in layers:
        nn.init.normal_(l.V.weight, std=k ** -0.5)
        nn.init.normal_(l.U.weight, std=l.rank ** -0.5)
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
    lowrank = _lowrank_group(32, 16, (4, 4))  # low-rank gate/up: its phase 2 measured slower with the epilogue
    for group in (three, unequal, lowrank, nn.Linear(32, 16)):
        assert dispatch.glu_forward(group, x) is None
    with dispatch.glu_kernel(False):
        assert not dispatch._STATE["glu"]
    assert dispatch._STATE["glu"]


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
        with torch.no_grad(), dispatch.glu_kernel(on), profile(activities=[ProfilerActivity.CUDA]) as prof:
            out[on] = dec.forward(ids, pos).float()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        fused = on and not lowrank  # low-rank gate/up groups keep their phase 2 and the SiLU·up kernel
        assert any("_dense_glu" in n for n in names) == fused
        assert any("_silu_mul_kernel" in n for n in names) == (not fused)
        dec.release()
    assert torch.equal(out[True], out[False])  # dense: the epilogue rounds as GEMV + SiLU·up do; low-rank: unchanged
