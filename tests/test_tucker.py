"""Tucker decomposition (HOOI), factors shared across layers and heads, their module types and checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import rankcut
from rankcut import CompressConfig, compress_
from rankcut.io import CheckpointError
from rankcut.linalg import hooi, shared_output_basis, truncated_svd, tucker_break_even
from rankcut.methods import get_method
from rankcut.methods.tucker import TuckerConfig, TuckerUnit, tucker_units
from rankcut.modules import SharedBasisLinear, TuckerLinear, module_type
from rankcut.units import TargetInfo
from conftest import shared_path
from tiny_models import forward, gpt2, llama, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = token_windows(8)
IDS = token_windows(2, seed=99)


def _config(**options) -> CompressConfig:
    return CompressConfig(method="tucker", keep=0.6, options=options, calib_samples=8, seq_len=16)


def _compressed(arch=llama, **options):
    model = arch()
    compress_(model, _config(**options), calib=CALIB, progress=False)
    return model


# ------------------------------------------------------------------------------------------------ HOOI


def _tensorly_error(slices, r_out, r_in, iters=500):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tucker

    tl.set_backend("numpy")
    T = torch.stack(slices).double().numpy()
    core, factors = tucker(T, rank=[len(slices), r_out, r_in], n_iter_max=iters, tol=1e-14, init="svd")
    return float(((T - tl.tucker_to_tensor((core, factors))) ** 2).sum())


@pytest.mark.parametrize("shape,ranks", [((4, 40, 30), (6, 5)), ((3, 25, 50), (10, 4)), ((6, 16, 16), (3, 3))])
def test_hooi_reaches_tensorly_error_on_random_tensors(shape, ranks):
    gen = torch.Generator().manual_seed(0)
    slices = list(torch.randn(*shape, generator=gen, dtype=torch.float64))
    U, cores, V, info = hooi(slices, *ranks, tol=1e-14, max_iter=500)
    ours = info["total"] - info["energy"]
    direct = sum(float(((w - U @ c @ V.mT) ** 2).sum()) for w, c in zip(slices, cores))
    assert ours == pytest.approx(direct, rel=1e-9)
    assert ours == pytest.approx(_tensorly_error(slices, *ranks), rel=1e-6)
    assert torch.allclose(U.mT @ U, torch.eye(ranks[0], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(V.mT @ V, torch.eye(ranks[1], dtype=torch.float64), atol=1e-10)


@pytest.mark.slow
def test_hooi_reaches_tensorly_error_on_real_weights():
    path = shared_path("testbed", "codellama-16m")
    if not path.exists():
        pytest.skip(f"needs the testbed model in {path}")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    slices = [layer.self_attn.k_proj.weight.detach().double() for layer in model.model.layers]  # 6 × 128 × 384
    U, cores, V, info = hooi(slices, 32, 64, tol=1e-12, max_iter=300)
    assert info["total"] - info["energy"] == pytest.approx(_tensorly_error(slices, 32, 64, 300), rel=1e-4)


def test_hooi_on_one_matrix_is_the_truncated_svd():
    """Eckart–Young: with r_out = r_in = r the best Tucker approximation of a matrix is its rank-r SVD."""
    A = torch.randn(50, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    U, cores, V, info = hooi([A], 7, 7)
    u, s, vh = truncated_svd(A, 7)
    assert torch.allclose(U @ cores[0] @ V.mT, (u * s) @ vh, atol=1e-12)
    assert info["total"] - info["energy"] == pytest.approx(float((torch.linalg.svdvals(A)[7:] ** 2).sum()), rel=1e-10)


def test_hooi_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        hooi([torch.randn(4, 5), torch.randn(5, 4)], 2, 2)
    with pytest.raises(ValueError, match="within the factors' dimensions"):
        hooi([torch.randn(4, 5)], 5, 2)
    with pytest.raises(ValueError, match="within the factors' dimensions"):
        hooi([torch.randn(4, 5)], 2, 6)


def test_tucker_break_even_is_the_root_of_the_parameter_balance():
    for H, W in ((4096, 4096), (4096, 11008), (384, 1024)):
        pr = tucker_break_even(H, W)
        assert pr * pr + pr * (H + W) == pytest.approx(H * W, rel=1e-12)
        r = math.floor(pr)
        assert r * r + r * (H + W) < H * W <= (r + 1) ** 2 + (r + 1) * (H + W)


def test_shared_output_basis_is_the_exact_minimiser():
    """For G = 1 it is the whitened SVD's left subspace; for G > 1 no other basis of that rank does better."""
    gen = torch.Generator().manual_seed(2)
    W = [torch.randn(12, 9, generator=gen, dtype=torch.float64) for _ in range(3)]
    X = [torch.randn(30, 9, generator=gen, dtype=torch.float64) for _ in range(3)]
    G = [x.mT @ x for x in X]

    def error(U):
        return sum(float(((w - U @ U.mT @ w) @ torch.linalg.cholesky(g)).pow(2).sum()) for w, g in zip(W, G))

    U, values, total = shared_output_basis(W, G, 4)
    assert error(U) == pytest.approx(total - float(values.sum()), rel=1e-10)
    for seed in range(20):
        Q, _ = torch.linalg.qr(torch.randn(12, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        assert error(Q) >= error(U) - 1e-9
    U1, _, _ = shared_output_basis(W[:1], G[:1], 4)
    u, _, _ = truncated_svd(W[0] @ torch.linalg.cholesky(G[0]), 4)
    assert torch.allclose(U1 @ U1.mT, u @ u.mT, atol=1e-10)


# ------------------------------------------------------------------------------------------------ method


def test_tucker_per_matrix_equals_whiten():
    a, b = llama(), llama()
    compress_(a, CompressConfig(method="whiten", keep=0.6, calib_samples=8, seq_len=16), calib=CALIB, progress=False)
    compress_(b, _config(group="matrix"), calib=CALIB, progress=False)
    assert a.rankcut_record.ranks == b.rankcut_record.ranks
    assert torch.allclose(forward(a, IDS), forward(b, IDS), atol=1e-4)


@pytest.mark.parametrize("options", [
    {"group": "heads"}, {"group": "layers", "share": "out"}, {"group": "layers", "share": "in"},
    {"group": "layers", "share": "both", "group_size": 2}, {"group": "layers"},
])
@pytest.mark.parametrize("arch", [llama, gpt2])
def test_group_layouts_count_their_parameters_and_round_trip(tmp_path, arch, options):
    model = _compressed(arch, **options)
    record = model.rankcut_record
    dense = arch()
    dense_total = sum(p.numel() for p in dense.parameters())
    # the summary counts what the model holds: shared factors once
    assert record.keep_model == pytest.approx(sum(p.numel() for p in model.parameters()) / dense_total)
    assert record.keep_targets <= 0.6 + 1e-9
    types = {e["type"] for e in record.targets.values()}
    assert types <= {"lowrank", "shared_basis", "tucker"} and types - {"lowrank"}
    ref = forward(model, IDS)
    rankcut.save(model, tmp_path / "ck")
    for loaded in (rankcut.load(tmp_path / "ck"), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")):
        assert torch.equal(forward(loaded, IDS), ref)
        for name, module in rankcut.modules.rankcut_modules(loaded).items():
            for local, owner in getattr(module, "ties", {}).items():
                assert module.get_parameter(local) is loaded.get_parameter(owner)


def test_shared_factor_is_stored_once(tmp_path):
    from safetensors import safe_open

    model = _compressed(llama, group="layers", share="out")
    rankcut.save(model, tmp_path / "ck")
    record = json.loads((tmp_path / "ck" / "rankcut.json").read_text())
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.0.self_attn.q_proj.U.weight" in keys
    assert "model.layers.1.self_attn.q_proj.U.weight" not in keys
    assert record["tied"]["model.layers.1.self_attn.q_proj.U.weight"] == "model.layers.0.self_attn.q_proj.U.weight"
    entry = record["targets"]["model.layers.1.self_attn.q_proj"]
    assert entry["type"] == "shared_basis" and entry["ties"] == {"U.weight": "model.layers.0.self_attn.q_proj.U.weight"}


def test_checkpoint_with_a_missing_tie_fails_loudly(tmp_path):
    model = _compressed(llama, group="layers", share="both")
    rankcut.save(model, tmp_path / "ck")
    path = tmp_path / "ck" / "rankcut.json"
    record = json.loads(path.read_text())
    del record["tied"]["model.layers.1.mlp.up_proj.inner.weight"]
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="shares inner.weight with model.layers.0.mlp.up_proj.*does not record"):
        rankcut.load(tmp_path / "ck")


def test_heads_layout_follows_the_attention_heads():
    model = _compressed(llama, group="heads")
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[0].self_attn.k_proj
    o = model.model.layers[0].self_attn.o_proj
    assert isinstance(q, TuckerLinear) and (q.heads, q.head_side) == (4, "out")
    assert isinstance(k, TuckerLinear) and (k.heads, k.head_side) == (2, "out")  # GQA: 2 key/value heads
    assert isinstance(o, TuckerLinear) and (o.heads, o.head_side) == (4, "in")
    assert not isinstance(model.model.layers[0].mlp.up_proj, TuckerLinear)  # not attention: per matrix


@pytest.mark.parametrize("heads,side", [(1, "out"), (4, "out"), (4, "in")])
def test_tucker_linear_computes_its_weight_product(heads, side):
    torch.manual_seed(0)
    layer = TuckerLinear(24, 16, 3, 5, heads, side, bias=True).double()
    x = torch.randn(7, 24, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ layer.weight_product().mT + layer.bias, atol=1e-12)
    rebuilt = module_type("tucker").from_record({"type": "tucker", **layer.record_entry()},
                                                torch.nn.Linear(24, 16), device="cpu")
    assert (rebuilt.r_out, rebuilt.r_in, rebuilt.heads, rebuilt.head_side) == (3, 5, heads, side)


def test_shared_basis_linear_computes_its_weight_product():
    layer = SharedBasisLinear(10, 6, 3).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ layer.weight_product().mT + layer.bias, atol=1e-12)


def test_units_of_layer_groups():
    infos = [TargetInfo(f"l.{b}.{k}", shape, b, k) for b in range(6) for k, shape in (("q", (8, 8)), ("up", (16, 8)))]
    units = tucker_units(infos, TuckerConfig(group="layers", group_size=4))
    assert [(u.targets[0].kind, len(u.targets)) for u in units] == [("q", 4), ("up", 4), ("q", 2), ("up", 2)]
    assert {u.layout for u in units} == {"shared_in"}  # the default
    auto = tucker_units(infos, TuckerConfig(group="layers", share="auto"))
    assert [u.layout for u in auto] == ["shared_out", "shared_out"]  # the larger side (m >= n)
    unit = TuckerUnit(tuple(infos[1::2][:3]), layout="shared_out")
    assert unit.params(5) == 16 * 5 + 3 * 5 * 8
    assert unit.params(unit.limit) < unit.dense_params <= unit.params(unit.limit + 1)
    assert unit.params(unit.uniform_rank(0.5)) <= 0.5 * unit.dense_params < unit.params(unit.uniform_rank(0.5) + 1)


def test_bad_input_gets_a_clear_error_and_writes_nothing(tmp_path):
    infos = [TargetInfo("l.0.q", (8, 8), 0, "q"), TargetInfo("l.1.q", (8, 6), 1, "q")]
    with pytest.raises(ValueError, match="must have one shape"):
        tucker_units(infos, TuckerConfig(group="layers"))
    spec = get_method("tucker")
    from rankcut.methods import Item

    item = Item(TargetInfo("x", (6, 4), 0, "q"), torch.randn(6, 4), torch.eye(4))
    with pytest.raises(ValueError, match="core rank 5 exceeds the factors' dimensions"):
        spec.decompose([item], TuckerConfig(group="matrix"), 5)
    with pytest.raises(ValueError, match="group must be one of"):
        TuckerConfig(group="stack")
    with pytest.raises(ValueError, match="share must be one of"):
        TuckerConfig(share="left")
    # a model whose grouped layers differ in shape: a clear error before anything is decomposed
    model = llama()
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(32, 48, bias=False)
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(48, 32, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers of a group must have one shape"):
        compress_(model, _config(group="layers"), calib=CALIB, progress=False)
    assert not rankcut.modules.rankcut_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recovery_trains_own_factors_and_keeps_ties(tmp_path):
    pytest.importorskip("peft")
    from rankcut.config import RecoverConfig
    from rankcut.recover import recover_
    from tiny_models import sample_text, tiny_tokenizer

    for train_shared in (False, True):
        model = _compressed(llama, group="layers", share="out")
        shared = model.model.layers[0].self_attn.q_proj.U.weight.detach().clone()
        text = tmp_path / "tune.txt"
        text.write_text(sample_text(3000))
        config = RecoverConfig(steps=3, seq_len=16, batch_size=2, lr=1e-2, train_shared=train_shared)
        recovered = recover_(model, tiny_tokenizer(), text, config, device="cpu", progress=False)
        recovered = recovered if isinstance(recovered, torch.nn.Module) else model
        q0 = recovered.model.layers[0].self_attn.q_proj
        q1 = recovered.model.layers[1].self_attn.q_proj
        assert isinstance(q1, SharedBasisLinear) and q1.U.weight is q0.U.weight
        assert torch.equal(q0.U.weight, shared) != train_shared
        rankcut.save(recovered, tmp_path / f"rec{train_shared}", overwrite=True)
        loaded = rankcut.load(tmp_path / f"rec{train_shared}")
        assert torch.equal(forward(loaded, IDS), forward(recovered, IDS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_shared_basis_linear_on_cuda_matches_its_product(rows):
    """The decode kernels serve SharedBasisLinear too (bias added apart); tied layers read one U."""
    torch.manual_seed(0)
    a = SharedBasisLinear(4096, 4096, 1024, bias=True, device="cuda", dtype=torch.bfloat16)
    b = SharedBasisLinear(4096, 4096, 1024, bias=True, device="cuda", dtype=torch.bfloat16)
    b.tie("U.weight", "a.U.weight", a.U.weight)
    for layer in (a, b):
        torch.nn.init.normal_(layer.bias)
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ layer.weight_product().mT + layer.bias.float())
        assert torch.allclose(layer(x).float(), ref, atol=0.05 * ref.abs().max().item())
    assert b.U.weight is a.U.weight
