"""The dense GEMV (rankcut.kernels.gemv) for one-token dense projections: its plan, where it applies and where
cuBLAS keeps the product, the kernel against a float64 reference (Triton's interpreter on the CPU, float16; the
GPU in bf16), and the decode step with it on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rankcut.bench.decode import make_decoder
from rankcut.kernels import dispatch, ops
from rankcut.kernels.plan import DENSE_MIN_ROWS, plan_dense
from rankcut.modules.grouped import DenseGroup
from interpreter import needs_triton, run_in_interpreter

ROOT = Path(__file__).resolve().parents[1]


def test_plan_takes_the_whole_row_up_to_4096_columns_then_tiles_of_2048():
    p = plan_dense(4096, 4096)
    assert (p.block_r, p.block_k, p.num_warps) == (1, 4096, 4)
    p = plan_dense(4096, 11008)
    assert (p.block_k, p.num_warps) == (2048, 8)
    assert plan_dense(50257, 768).block_k == 1024  # next power of two: one tile, masked
    assert plan_dense(8, 8, block_r=4, block_k=16, num_warps=2) == type(p)(4, 16, 2, True)
    with pytest.raises(ValueError, match="bad dense problem"):
        plan_dense(0, 16)


def test_dense_forward_declines_what_it_does_not_handle():
    w = torch.randn(DENSE_MIN_ROWS, 64)
    x = torch.randn(1, 64)
    assert dispatch.dense_forward(w, None, x) is None  # CPU tensors: cuBLAS/eager keep them
    lin = nn.Linear(64, DENSE_MIN_ROWS)
    assert torch.equal(ops.project(lin, x), lin(x))  # the CPU result is the module's own, bit for bit
    g = DenseGroup([nn.Linear(64, 32), nn.Linear(64, 16)])
    assert torch.equal(g(x), torch.cat([l(x) for l in g.layers], -1))
    with dispatch.dense_kernel(False):
        assert not dispatch._STATE["dense"]
    assert dispatch._STATE["dense"]


CHECK = """
import sys, torch
sys.path[:0] = [{root!r}]
from rankcut.kernels.gemv import dense_gemv
from rankcut.kernels.plan import plan_dense
torch.manual_seed(0)
dt = torch.float16
for n, k, kw, bias in [(40, 256, {{}}, False), (37, 384, {{}}, True), (33, 640, {{"block_k": 128}}, True),
                       (24, 300, {{"block_r": 4, "block_k": 64}}, False)]:
    W = (torch.randn(n, k) / 16).to(dt)
    x = torch.randn(1, k).to(dt)
    b = torch.randn(n).to(dt) if bias else None
    y = torch.empty(1, n, dtype=dt)
    plan = plan_dense(n, k, pdl=False, **kw)
    assert (plan.block_k < k) == ("block_k" in kw)
    dense_gemv(x, W, b, y, plan)
    want = x.double() @ W.double().T + (b.double() if bias else 0)
    err = (y.double() - want).abs().max().item()
    assert err <= 2e-3 * want.abs().max().item(), (n, k, kw, err)
print("ok")
"""


@needs_triton
def test_kernel_in_the_triton_interpreter():
    run_in_interpreter(CHECK.format(root=str(ROOT)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 11008), (2048, 768)])
def test_dense_gemv_matches_float64_on_gpu(shape):
    n, k = shape
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = dispatch.dense_forward(lin.weight, lin.bias, x)
        assert y is not None and y.shape == (1, 1, n) and y.dtype == torch.bfloat16
        want = x.double() @ lin.weight.double().T + lin.bias.double()
        assert float((y.double() - want).abs().max()) <= 1e-2 * float(want.abs().max())
        ref = lin(x)  # cuBLAS: the same fp32-accumulated product, rounded once
        assert float((y.float() - ref.float()).abs().max()) <= 1e-2 * float(ref.float().abs().max())
        assert dispatch.dense_forward(lin.weight, lin.bias, x.expand(1, 2, k).contiguous()) is None  # two rows
        assert dispatch.dense_forward(lin.weight[:, : k // 2], None, x[..., : k // 2]) is None  # not contiguous
        small = nn.Linear(k, DENSE_MIN_ROWS - 1, device="cuda", dtype=torch.bfloat16)
        assert dispatch.dense_forward(small.weight, None, x) is None
        with dispatch.dense_kernel(False):
            assert dispatch.dense_forward(lin.weight, lin.bias, x) is None


@pytest.mark.gpu
def test_decode_step_with_and_without_the_dense_gemv_on_gpu():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 2048, (1, 1), device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for on in (True, False):
        dec = make_decoder(model, 1, 16, dense_gemv=on)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            out[on] = dec.forward(ids, pos).float()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert any("_dense_gemv" in n for n in names) == on
        dec.release()
    assert float((out[True] - out[False]).abs().max()) <= 2e-2 * float(out[False].abs().max())
