"""Add + RMSNorm and SiLU·up folded into the next low-rank projection's phase 1 (rankcut.kernels.folds): the
prologue kernels against the separate kernels' numerics (Triton's interpreter on the CPU, float16; the GPU
in bf16), the decode step with and without folding, and where folding does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from rankcut.bench.decode import make_decoder
from rankcut.bench.models import random_lowrank_
from rankcut.kernels import ops
from tiny_models import llama
from interpreter import needs_triton, run_in_interpreter

ROOT = Path(__file__).resolve().parents[1]


def wide_llama():
    """A two-block Llama wide enough for the kernels' tiles (hidden 256, head_dim 64, GQA 2:1)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def eager_add_rmsnorm(h, res, w, eps):
    """What rankcut.kernels.glue.add_rmsnorm computes (fp32 statistic, the same roundings)."""
    dt = h.dtype
    s = (h.float() + res.float()).to(dt) if res is not None else h
    xs = s.float()
    n = (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
    return (n.float() * w.float()).to(dt), s


def eager_silu_mul(gu):
    """What rankcut.kernels.glue.silu_mul computes."""
    g, u = gu.float().chunk(2, dim=-1)
    a = (g / (1 + torch.exp(-g))).to(gu.dtype).float()
    return (a * u).to(gu.dtype)


CHECK = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from test_folds import eager_add_rmsnorm, eager_silu_mul
from rankcut.kernels.lowrank import Scratch, launch
from rankcut.kernels.plan import plan_lowrank
torch.manual_seed(0)
dt = torch.float16

def run(x2d, V, Us, ranks, ns, K, prologue=None, **plan_kw):
    U = torch.cat([u.reshape(-1) for u in Us])
    y = torch.empty(1, sum(ns), dtype=dt)
    plan = plan_lowrank(1, K, ranks, ns, 132, pdl=False, **plan_kw)
    launch(x2d, V, U, None, y, Scratch(torch.device("cpu"), sum(ranks), ranks, ns), plan, prologue=prologue)
    return y

# single-tile plans only: the interpreter cannot run loops bounded by computed values (the GPU test covers them)
for K, ranks, ns, kw in [(256, [32, 16], [64, 48], {{}}), (384, [24], [40], {{}})]:
    V = (torch.randn(sum(ranks), K) / 16).to(dt)
    Us = [(torch.randn(n, r) / 4).to(dt) for n, r in zip(ns, ranks)]
    # SiLU*up: the same input values as the separate kernel, so the same output bit for bit
    gu = torch.randn(1, 2 * K).to(dt)
    want = run(eager_silu_mul(gu), V, Us, ranks, ns, K, **kw)
    got = run(gu, V, Us, ranks, ns, K, {{"kind": "silu"}}, **kw)
    assert torch.equal(got, want), (K, (got.float() - want.float()).abs().max())
    h, res, w = torch.randn(1, K).to(dt), torch.randn(1, K).to(dt), (1 + torch.randn(K) / 8).to(dt)
    for r in (res, None):
        x, s_want = eager_add_rmsnorm(h, r, w, 1e-5)
        want = run(x, V, Us, ranks, ns, K)
        s = torch.empty_like(h)
        got = run(h, V, Us, ranks, ns, K, {{"kind": "add_rmsnorm", "res": r, "weight": w, "eps": 1e-5, "out": s}})
        assert torch.equal(s, s_want)
        assert (got.float() - want.float()).abs().max().item() <= 2e-3 * want.float().abs().max().item()
V = torch.zeros(8, 384, dtype=dt)
try:
    run(torch.zeros(1, 384, dtype=dt), V, [torch.zeros(4, 8, dtype=dt)], [8], [4], 384,
        {{"kind": "rmsnorm", "weight": torch.ones(384, dtype=dt), "out": torch.zeros(1, 384, dtype=dt)}}, block_k=128,
        split_k=1)
except ValueError as err:
    assert "whole row in one phase-1 tile" in str(err)
else:
    raise AssertionError("no error")
print("ok")
"""


@needs_triton
def test_prologues_in_the_triton_interpreter():
    run_in_interpreter(CHECK.format(root=str(ROOT), tests=str(ROOT / "tests")))


def test_fold_is_the_separate_path_on_the_cpu():
    model = llama()
    random_lowrank_(model, 0.5)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    pos = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        a = make_decoder(model, 1, 8, fold=True).forward(ids, pos)
        b = make_decoder(model, 1, 8, fold=False).forward(ids, pos)
    assert torch.equal(a, b)
    h = torch.randn(1, 1, 32)
    norm = model.model.layers[0].input_layernorm
    proj = model.model.layers[0].mlp.gate_proj
    y, s = ops.norm_project(proj, h, None, norm, fold=True)
    assert torch.equal(s, h) and torch.equal(y, proj(norm(h)))


@pytest.mark.gpu
@pytest.mark.parametrize("lowrank", [True, False])
def test_folded_decode_step_matches_the_unfolded_one_on_gpu(lowrank):
    from rankcut.bench.loop import DecodeLoop

    model = wide_llama().to("cuda", torch.bfloat16)
    if lowrank:
        random_lowrank_(model, 0.5)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=gen).cuda()
    forced = torch.randint(0, model.config.vocab_size, (6, 1, 1), generator=gen).cuda()
    logits = {}
    for fold in (True, False):
        dec = make_decoder(model, batch=1, max_len=40, fold=fold)
        with torch.no_grad():
            pos = torch.zeros(1, dtype=torch.long, device="cuda")
            dec.forward(prompt, pos)
            steps = []
            for t in range(6):
                pos.fill_(7 + t)
                steps.append(dec.forward(forced[t], pos).float())
            logits[fold] = torch.stack(steps)
            if fold:
                runs = []
                for graph in (False, True):
                    loop = DecodeLoop(dec, prompt, 16, use_graph=graph)
                    loop.prefill()
                    loop.run_steps()
                    runs.append(loop.tokens.tolist())
                assert runs[0] == runs[1]
        dec.release()
    a, b = logits[True], logits[False]
    assert float((a - b).norm() / b.norm()) < 1e-2


@pytest.mark.gpu
def test_folds_match_the_separate_kernels_on_gpu():
    from rankcut.kernels import dispatch, folds
    from rankcut.modules import LowRankLinear
    from rankcut.modules.grouped import make_group

    model = wide_llama().to("cuda", torch.bfloat16)
    random_lowrank_(model, 0.5)
    layer = model.model.layers[0]
    group = make_group([layer.mlp.gate_proj, layer.mlp.up_proj])
    h, res = torch.randn(2, 1, 1, 256, device="cuda", dtype=torch.bfloat16)
    norm = layer.post_attention_layernorm
    with torch.no_grad():
        y, s = folds.norm_project(group, h, res, norm.weight, norm.variance_epsilon)
        x, s_want = ops.add_rmsnorm(h, res, norm)
        assert torch.equal(s, s_want)
        want = group(x)
        assert float((y.float() - want.float()).abs().max()) <= 1e-2 * float(want.float().abs().max())
        gu = want
        got = folds.gated_project(layer.mlp.down_proj, gu)
        assert torch.equal(got, layer.mlp.down_proj(ops.silu_mul(gu, layer.mlp.act_fn, True)))
        assert folds.gated_project(layer.mlp.down_proj, gu.expand(2, 1, -1).contiguous()) is None  # two rows
        # K in several tiles of one program (rank 512: enough row blocks that the plan does not split K)
        wide = LowRankLinear(8192, 1024, 512, bias=True, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(1, 1, 2 * 8192, device="cuda", dtype=torch.bfloat16)
        assert dispatch.get_plan(1, 8192, [512], [1024], gu.device).k_iters > 1
        assert torch.equal(folds.gated_project(wide, gu), wide(ops.silu_mul(gu, torch.nn.SiLU(), True)))
        dense = torch.nn.Linear(256, 512, bias=False, device="cuda", dtype=torch.bfloat16)
        assert folds.norm_project(dense, h, res, norm.weight, 1e-5) is None  # not a low-rank layer
    group.unshare()
