"""Compression on a CUDA device: same result as on the CPU, weights back home, memory bounded by one block.

All tests carry the ``gpu`` marker; ``conftest.py`` skips them when no CUDA device is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import rankcut
from rankcut.modules import LowRankLinear
from rankcut.targets import find_blocks
from tiny_models import forward, llama, token_windows

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


@pytest.mark.parametrize("method", ["whiten", "asvd", "svd"])
def test_cuda_matches_cpu(method):
    """float32 tiny Llama (GQA): compressing on CUDA gives the CPU's ranks and, to rounding, its logits."""
    dense = llama()
    on_cpu, on_gpu = copy.deepcopy(dense), copy.deepcopy(dense)
    calib = token_windows(16)
    config = rankcut.CompressConfig(method=method, keep=0.6, calib_samples=16, batch_size=4)
    s_cpu = rankcut.compress_(on_cpu, config, calib=calib, device="cpu", progress=False)
    s_gpu = rankcut.compress_(on_gpu, config, calib=calib, device="cuda", progress=False)
    assert {r.name: r.rank for r in s_gpu.rows} == {r.name: r.rank for r in s_cpu.rows}
    assert s_gpu.keep_targets == s_cpu.keep_targets
    for a, b in zip(s_gpu.rows, s_cpu.rows):
        assert a.energy == pytest.approx(b.energy, rel=1e-5, abs=1e-7)
    ids = token_windows(4, seed=7)
    out_cpu, out_gpu, out_dense = forward(on_cpu, ids), forward(on_gpu, ids), forward(dense, ids)
    assert torch.isfinite(out_gpu).all()
    gap = _rel(out_gpu, out_cpu)
    assert gap < 1e-4
    assert _rel(out_cpu, out_dense) > 100 * gap  # the comparison is not vacuous: compression changed the model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layerwise_leaves_weights_on_cpu(dtype):
    model = llama().to(dtype)
    summary = rankcut.compress_(
        model, rankcut.CompressConfig(method="whiten", keep=0.8, calib_samples=8, batch_size=4),
        calib=token_windows(8), device="cuda", progress=False,
    )
    assert summary.peak_gpu_bytes and summary.peak_gpu_bytes > 0  # the GPU did the work
    assert not summary.dense_targets
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {dtype}
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 14
    assert torch.isfinite(forward(model, token_windows(2, seed=3)).float()).all()


def _multi_block_llama(layers: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_peak_gpu_memory_is_one_block_not_the_model():
    """Layerwise compression never holds more than one block's weights on the GPU, and its peak memory is
    under a bound computed from one block, the calibration activations and the float64 working set, which
    is itself well under the size of the model."""
    layers, samples, seq, batch = 48, 16, 64, 2
    model = _multi_block_llama(layers)
    cfg = model.config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    model_bytes = _nbytes(model.parameters())
    _, blocks = find_blocks(model)
    block_bytes = _nbytes(blocks[0].parameters())
    outside_bytes = model_bytes - _nbytes(blocks.parameters())
    f32, f64 = 4, 8
    acts = samples * seq * h * f32  # one set of block inputs (or outputs) for all windows
    rotary = 2 * samples * seq * (h // cfg.num_attention_heads) * f32  # captured cos/sin
    forward_tmp = 16 * batch * seq * max(h, inter) * f64  # one batch's activations, incl. float64 copies
    grams = 2 * (3 * h * h + inter * inter) * f64  # accumulators (q/k/v, o, gate/up, down) + one product
    decomposition = 8 * max(h, inter) ** 2 * f64  # W, L, A, SVD factors and workspace (float64 upper bound)
    bound = outside_bytes + 2 * block_bytes + 2 * acts + rotary + forward_tmp + grams + decomposition
    assert bound < model_bytes / 2  # so the assertion below shows the whole model never sat on the GPU

    resident = []

    def watch(module, args):
        resident.append(_nbytes(p for p in model.parameters() if p.device.type == "cuda"))

    handles = [block.register_forward_pre_hook(watch) for block in blocks]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(CUDA)
    try:
        summary = rankcut.compress_(
            model, rankcut.CompressConfig(method="whiten", keep=0.8, calib_samples=samples, batch_size=batch),
            calib=torch.randint(0, cfg.vocab_size, (samples, seq), generator=torch.Generator().manual_seed(0)),
            device="cuda", progress=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    peak = torch.cuda.max_memory_allocated(CUDA) - baseline
    assert resident and max(resident) <= outside_bytes + block_bytes
    assert 0 < peak < bound, (peak, bound, model_bytes)
    assert summary.peak_gpu_bytes is not None
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _whitened(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float32 CUDA matrix like the one ``whiten`` factorises: W L, L the Cholesky factor of an
    activation Gram matrix with log-normal channel scales."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(m, n, generator=gen, device=CUDA, dtype=torch.float64) * 0.02
    X = torch.randn(4 * n, n, generator=gen, device=CUDA, dtype=torch.float64)
    X *= torch.exp(torch.randn(n, generator=gen, device=CUDA, dtype=torch.float64))
    return (W @ torch.linalg.cholesky(X.mT @ X)).float()


@pytest.mark.parametrize("shape", [(768, 512), (512, 768), (384, 384)])
def test_cuda_truncated_svd_matches_float64_svd(shape):
    """On CUDA, truncated_svd takes the float64 Gram-eigh route; it must match a float64 SVD."""
    from rankcut.linalg import _gram_eigh_svd, truncated_svd

    m, n = shape
    k = int(0.8 * m * n / (m + n))
    A = _whitened(m, n)
    assert _gram_eigh_svd(A, k) is not None  # the route under test is really taken
    U, S, Vh = truncated_svd(A, k)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n) and U.dtype == torch.float32
    A64 = A.double().cpu()
    _, S0, _ = torch.linalg.svd(A64, full_matrices=False)
    U, S, Vh = U.double().cpu(), S.double().cpu(), Vh.double().cpu()
    assert float(((S - S0[:k]).abs() / S0[:k]).max()) < 1e-6
    optimum = float(S0[k:].pow(2).sum().sqrt())  # Eckart-Young
    assert float(torch.linalg.matrix_norm(A64 - (U * S) @ Vh)) <= optimum * (1 + 1e-6)
    eye = torch.eye(k, dtype=torch.float64)
    assert float((U.mT @ U - eye).abs().max()) < 1e-5
    assert float((Vh @ Vh.mT - eye).abs().max()) < 1e-5


def test_cuda_truncated_svd_falls_back_when_ill_conditioned():
    """A rank-deficient matrix (σ_k = 0) is refused by the Gram route and solved by torch.linalg.svd."""
    from rankcut.linalg import _gram_eigh_svd, truncated_svd

    gen = torch.Generator(device="cuda").manual_seed(1)
    A = torch.randn(300, 20, generator=gen, device=CUDA) @ torch.randn(20, 200, generator=gen, device=CUDA)
    assert _gram_eigh_svd(A, 40) is None
    U, S, Vh = truncated_svd(A, 40)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    ref = torch.linalg.svd(A.double().cpu(), full_matrices=False).S[:20]
    assert torch.allclose(S[:20].double().cpu(), ref, rtol=1e-4)
    # cuSOLVER's default (Jacobi) float32 SVD: relative error ~4e-5 measured on an H200
    assert float(torch.linalg.matrix_norm((U * S) @ Vh - A) / torch.linalg.matrix_norm(A)) < 2e-4
