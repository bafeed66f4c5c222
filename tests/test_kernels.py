"""Low-rank kernels: tile plans and dispatch (CPU), and the Triton kernels against the eager reference (GPU).

GPU tests carry the ``gpu`` marker (skipped without CUDA by conftest.py). They compare against a float64
reference computed from the same bf16/fp16 tensors and require the kernel's error to be of the order of
the eager bf16 path's own error.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from rankcut.kernels import plan_lowrank, tile_table
from rankcut.modules.grouped import DenseGroup, LowRankGroup, SeparateGroup, make_group
from rankcut.kernels import dispatch
from rankcut.kernels.plan import MAX_M, next_pow2
from rankcut.modules import LowRankLinear

CUDA = torch.cuda.is_available()


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


SHAPES = [(4096, 4096, [128]), (4096, 4096, [2047]), (11008, 4096, [2984]), (4096, 11008, [1024]),
          (6144, 4096, [1024, 409, 409]), (100, 37, [5]), (64, 64, [64])]


@pytest.mark.parametrize("m", [1, 2, 16])
@pytest.mark.parametrize("mode", ["fused", "two"])
@pytest.mark.parametrize("n_out, k, ranks", SHAPES)
def test_plan_covers_problem(m, mode, n_out, k, ranks):
    ns = [n_out] if len(ranks) == 1 else [4096, 1024, 1024]
    p = plan_lowrank(m, k, ranks, ns, 132, mode=mode)
    R = sum(ranks)
    assert all(_pow2(v) for v in (p.block_r, p.block_k, p.block_n, p.block_rk))
    assert math.ceil(R / p.block_r) * p.split_k == p.tiles1
    assert p.split_k * p.k_iters * p.block_k >= k > (p.split_k - 1) * p.k_iters * p.block_k  # K covered, no empty split
    assert p.tiles2 == len(tile_table(ranks, ns, p.block_n)) // 8
    assert p.m_pad == (1 if m == 1 else 16)
    if m > 1:
        assert min(p.block_r, p.block_n, p.block_rk, p.block_k) >= 16  # tl.dot sizes
    if mode == "fused":
        assert 1 <= p.grid <= 132 and p.grid <= max(p.tiles1, p.tiles2)  # persistent: every program resident
        if m == 1:
            assert p.k_iters == 1 and p.block_rk >= max(ranks)  # fused GEMV: a whole rank in one load
    else:
        assert not p.prefetch and p.grid == p.tiles2


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="m must be"):
        plan_lowrank(MAX_M + 1, 64, [8], [64], 132)
    with pytest.raises(ValueError, match="mode"):
        plan_lowrank(1, 64, [8], [64], 132, mode="three")
    with pytest.raises(ValueError, match="bad problem"):
        plan_lowrank(1, 64, [8, 4], [64], 132)


def test_wide_inputs_take_four_rows_of_2048_columns_in_phase_1():
    """K wider than one 4096-element tile (the down projection): 4 rows × 2048 columns per load when there are
    enough rows of V (measured faster on the H200); narrow K, few rows, forced tiles and the quantised kernels'
    own tile budget keep one row × 4096."""
    p = plan_lowrank(1, 11008, [1492], [4096], 132)
    assert (p.block_r, p.block_k, p.k_iters, p.split_k) == (4, 2048, 6, 1)
    assert (plan_lowrank(1, 4096, [1024], [4096], 132).block_r, plan_lowrank(1, 4096, [1024], [4096], 132).block_k) \
        == (1, 4096)
    assert plan_lowrank(1, 11008, [512], [4096], 132).block_r == 1  # too few rows for 4 per program
    assert plan_lowrank(1, 11008, [1492], [4096], 132, max_elems=4096).block_r == 1  # the quantised plans
    assert plan_lowrank(1, 11008, [1492], [4096], 132, block_k=1024).block_k == 1024


@pytest.mark.parametrize("block_n", [1, 8, 16, 64])
def test_tile_table_partitions_rows_without_straddling(block_n):
    ranks, ns = [16, 5, 7], [40, 16, 9]
    table = torch.tensor(tile_table(ranks, ns, block_n)).view(-1, 8)
    covered = []
    for start, end, u_off, r0, rs, srow, *_ in table.tolist():
        seg = [i for i, s in enumerate([0, 40, 56]) if s == srow][0]
        assert (rs, r0, u_off, end) == (ranks[seg], sum(ranks[:seg]), sum(n * r for n, r in zip(ns[:seg], ranks[:seg])), srow + ns[seg])
        covered += list(range(start, min(start + block_n, end)))
    assert covered == list(range(sum(ns)))


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_forward_is_the_eager_path_bit_for_bit(bias):
    torch.manual_seed(0)
    layer = LowRankLinear(24, 40, 6, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 24, dtype=torch.bfloat16)  # decode-sized: the kernel's case on CUDA
    with torch.no_grad():
        assert torch.equal(layer(x), layer.U(layer.V(x)))
    assert dispatch.lowrank_forward(layer, x) is None
    if not CUDA:
        # torch itself may import triton where it is installed; what must stay unloaded is rankcut's kernels
        assert "rankcut.kernels.lowrank" not in sys.modules and "rankcut.kernels.gemv" not in sys.modules


def test_kernel_pays_rule():
    from rankcut.kernels.plan import DOT_MAX_RANK, kernel_pays

    assert kernel_pays(1, [4096]) and kernel_pays(16, [DOT_MAX_RANK]) and not kernel_pays(16, [DOT_MAX_RANK + 8])
    assert kernel_pays(16, [2047])  # cuBLAS is slow for inner dimensions that are not multiples of 8
    assert not kernel_pays(MAX_M + 1, [8]) and not kernel_pays(0, [8])


def test_eligibility_rules():
    x = torch.randn(2, 8)
    assert not dispatch.eligible(x, [], 2)  # CPU
    dispatch.set_enabled(False)
    try:
        assert not dispatch.enabled()
    finally:
        dispatch.set_enabled(True)
    with dispatch.plan_overrides(mode="two", max_elems=8192):
        assert dispatch._OVERRIDES == {"mode": "two", "max_elems": 8192}
    assert dispatch._OVERRIDES == {}


def _lowrank(n_in, n_out, r, bias, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    layer = LowRankLinear(n_in, n_out, r, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def test_lowrank_group_matches_layers_and_keeps_state_dict():
    layers = [_lowrank(32, 48, 8, True, seed=1), _lowrank(32, 16, 3, False, seed=2), _lowrank(32, 16, 5, True, seed=3)]
    holder = nn.ModuleList(layers)
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = torch.cat([l(x) for l in layers], dim=-1)
        group = LowRankGroup(layers)
        got = group(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = holder.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert layers[0].V.weight.data_ptr() == group.V_cat.data_ptr()  # shared, not copied
    group.unshare()
    assert layers[0].V.weight.data_ptr() != group.V_cat.data_ptr()
    assert all(torch.equal(holder.state_dict()[k], before[k]) for k in before)


def test_dense_and_mixed_groups():
    torch.manual_seed(0)
    dense = [nn.Linear(16, 8), nn.Linear(16, 4, bias=False)]
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = torch.cat([l(x) for l in dense], dim=-1)
        assert isinstance(make_group(dense), DenseGroup)
        torch.testing.assert_close(make_group(dense)(x), want)
        mixed = [nn.Linear(16, 8), _lowrank(16, 8, 2, True)]
        group = make_group(mixed)
        assert isinstance(group, SeparateGroup)
        torch.testing.assert_close(group(x), torch.cat([l(x) for l in mixed], dim=-1))
    with pytest.raises(ValueError, match="in_features"):
        LowRankGroup([_lowrank(16, 8, 2, True), _lowrank(12, 8, 2, True)])


# ----------------------------------------------------------------------------------------------- GPU


def _rel(a, b):
    return float(torch.linalg.vector_norm((a.double() - b.double())) / torch.linalg.vector_norm(b.double()))


def _reference(layer, x):
    t = x.double() @ layer.V.weight.double().t()
    y = t @ layer.U.weight.double().t()
    return y + layer.U.bias.double() if layer.U.bias is not None else y


GPU_SHAPES = [(256, 512, 16), (1000, 768, 100), (4096, 4096, 512), (11008, 4096, 1024), (4096, 11008, 300), (1024, 4096, 818)]


GPU_CASES = ([(s, b, m, torch.bfloat16, mode) for s in GPU_SHAPES for b in (True, False) for m in (1, 3, 16)
              for mode in ("fused", "two")]
             + [(s, True, m, torch.float16, "fused") for s in GPU_SHAPES for m in (1, 3, 16)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape, bias, rows, dtype, mode", GPU_CASES)
def test_kernel_matches_reference(shape, bias, rows, dtype, mode):
    n_out, n_in, rank = shape
    layer = _lowrank(n_in, n_out, rank, bias, dtype, "cuda")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    with torch.no_grad(), dispatch.plan_overrides(mode=mode):
        for rep in range(3):  # fresh inputs each call; split-K alternates scratch halves by epoch
            x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
            got = dispatch.lowrank_forward(layer, x, force=True)
            assert got is not None and torch.isfinite(got).all()
            ref = _reference(layer, x)
            eager = layer.U(layer.V(x))
            assert _rel(got, ref) <= max(2 * _rel(eager, ref), 1e-3), (rep, _rel(got, ref), _rel(eager, ref))
        plan = dispatch.get_plan(rows, n_in, [rank], [n_out], x.device)
    sync = layer._rankcut_scratch.sync.tolist()
    assert sync[0] == sync[1] == sync[3] == 0  # counters reset, no barrier timed out
    assert sync[2] == (3 if plan.mode == "fused" or plan.split else 0)  # the epoch advances once per split call


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{"max_elems": 8192}, {"pdl": False}, {"split_k": 4}, {"block_r": 32},
                                       {"block_n": 64}, {"mode": "fused", "prefetch": False}])
def test_kernel_plan_variants(overrides):
    layer = _lowrank(4096, 4096, 640, True, torch.bfloat16, "cuda")
    with torch.no_grad(), dispatch.plan_overrides(**overrides):
        for rows in (1, 16, 1, 7):  # alternating plans on one scratch
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
            ref, eager = _reference(layer, x), layer.U(layer.V(x))
            assert _rel(dispatch.lowrank_forward(layer, x, force=True), ref) <= max(2 * _rel(eager, ref), 1e-3)
    assert layer._rankcut_scratch.sync[3].item() == 0  # no barrier ever timed out


@pytest.mark.gpu
def test_forward_dispatch_rules_on_cuda():
    layer = _lowrank(64, 96, 8, True, torch.bfloat16, "cuda")
    x = torch.randn(2, 5, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer(x[:, :1]).shape == (2, 1, 96)
        assert hasattr(layer, "_rankcut_scratch")  # the kernel ran for 2 rows
        assert torch.equal(layer(x), layer.U(layer.V(x)))  # 10 rows > MAX_M: cuBLAS, identical
    y = layer(x[:, :1])  # grad mode with parameters that need grad: eager, autograd works
    y.float().sum().backward()
    assert layer.V.weight.grad is not None
    with torch.no_grad():
        assert dispatch.lowrank_forward(layer.float(), x[:, :1].float()) is None  # fp32: eager


@pytest.mark.gpu
def test_kernel_in_cuda_graph_and_group():
    torch.manual_seed(0)
    layers = [_lowrank(512, 512, 64, True, torch.bfloat16, "cuda", s) for s in range(2)]
    layers.append(_lowrank(512, 128, 20, False, torch.bfloat16, "cuda", 5))
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = torch.cat([l.U(l.V(x)) for l in layers], dim=-1)
        group = LowRankGroup(layers, force=True)
        out = group(x)
        assert _rel(out, want) < 1e-2
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = group(x)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            assert torch.equal(captured, group(x))
