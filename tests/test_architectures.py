"""Target discovery and compression across every supported architecture and method (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankcut
from rankcut import CompressConfig, LowRankLinear, compress_, find_targets
from rankcut.calibrate import StatsCollector, model_inputs
from rankcut.modules import dense_shape, dense_weight
from rankcut.linalg import break_even_rank
from tiny_models import ARCHS, forward, token_windows

ARCH_NAMES = list(ARCHS)
METHODS = ["svd", "asvd", "whiten"]
CALIB = token_windows(8)
TEST_IDS = token_windows(2, seed=99)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(method: str, **kw) -> CompressConfig:
    kw.setdefault("keep", 0.5)
    return CompressConfig(method=method, calib_samples=8, batch_size=4, **kw)


def expected_rank(m: int, n: int, keep: float) -> int | None:
    """floor(keep·mn/(m+n)) (at least 1), or None when that reaches break-even (the target stays dense)."""
    r = max(1, math.floor(keep * m * n / (m + n)))
    return None if r >= break_even_rank(m, n) else r


def make_low_rank(model: nn.Module, rank: int = 3, scale: float = 0.25, seed: int = 7) -> None:
    """Replace every default target's weight by an exact rank-``rank`` matrix (so truncation is lossless)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in find_targets(model).values():
            W = dense_weight(module)  # (out, in) view, also for Conv1D
            m, n = W.shape
            A = torch.randn(m, rank, generator=gen) * scale
            B = torch.randn(rank, n, generator=gen) * scale
            W.copy_((A @ B).to(W.dtype))


def products(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (m.U.weight @ m.V.weight).detach() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


# ---------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_default_targets(arch):
    spec = ARCHS[arch]
    model = spec.build()
    targets = find_targets(model)
    assert len(targets) == spec.n_targets
    for name in spec.targets:
        assert name in targets, f"{name} missing from {sorted(targets)}"
    for name in spec.not_targets:
        assert name not in targets
        assert not any(t.startswith(name + ".") for t in targets)
    assert not any("embed" in t or "lm_head" in t or "pooler" in t or "wte" in t for t in targets)


def test_gpt2_targets_are_conv1d_with_transposed_shape():
    from transformers.pytorch_utils import Conv1D

    model = ARCHS["gpt2"].build()
    targets = find_targets(model)
    c_attn = targets["transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn, Conv1D)
    assert tuple(c_attn.weight.shape) == (32, 96)  # stored (in, out)
    assert dense_shape(c_attn) == (96, 32)  # seen as (out, in)


def test_include_and_exclude_patterns():
    model = ARCHS["llama"].build()
    only_q = find_targets(model, include=["re:q_proj$"])
    assert sorted(only_q) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    no_mlp = find_targets(model, exclude=["re:\\.mlp\\."])
    assert len(no_mlp) == 8 and not any(".mlp." in n for n in no_mlp)
    exact = find_targets(model, include=["model.layers.1.mlp.down_proj"])
    assert list(exact) == ["model.layers.1.mlp.down_proj"]
    both = find_targets(model, include=["re:self_attn"], exclude=["re:layers\\.0\\."])
    assert sorted(both) == [f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]
    # the LM head is a target only when named
    assert "lm_head" in find_targets(model, include=["lm_head"])


def test_include_tied_lm_head_is_refused():
    model = ARCHS["gpt2"].build()
    with pytest.raises(ValueError, match="tied"):
        find_targets(model, include=["lm_head"])


def test_no_targets_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no target layers found.*Sequential"):
        find_targets(model)
    llama = ARCHS["llama"].build()
    with pytest.raises(ValueError, match="no target layers found"):
        find_targets(llama, include=["re:does_not_exist"])
    with pytest.raises(ValueError, match="no target layers found"):
        find_targets(llama, exclude=["re:.*"])
    with pytest.raises(ValueError, match="no target layers found"):
        compress_(nn.Sequential(nn.Embedding(10, 8)), CompressConfig(method="svd"), progress=False)


# ------------------------------------------------------------------------------------------ compression


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_compress_every_arch_and_method(arch, method):
    spec = ARCHS[arch]
    model = spec.build()
    dense_out = forward(model, TEST_IDS)
    shapes = {n: dense_shape(m) for n, m in find_targets(model).items()}
    params_before = sum(p.numel() for p in model.parameters())
    keep = 0.5
    summary = compress_(model, config(method, keep=keep), calib=CALIB, progress=False)

    # every target became LowRankLinear of rank floor(keep·mn/(m+n))
    assert [r.name for r in summary.rows] == list(shapes)
    for name, (m, n) in shapes.items():
        layer = model.get_submodule(name)
        want = expected_rank(m, n, keep)
        assert want is not None
        assert isinstance(layer, LowRankLinear), name
        assert layer.rank == want, (name, layer.rank, want)
        assert (layer.out_features, layer.in_features) == (m, n)
        assert tuple(layer.U.weight.shape) == (m, want) and tuple(layer.V.weight.shape) == (want, n)
    # no dense linear is left inside the blocks
    assert not find_targets_safe(model)

    # the summary adds up
    rows = {r.name: r for r in summary.rows}
    for name, (m, n) in shapes.items():
        row = rows[name]
        assert row.shape == (m, n)
        assert row.params_before == m * n
        assert row.params_after == row.rank * (m + n)
        assert row.rank < break_even_rank(m, n)
    before = sum(r.params_before for r in summary.rows)
    after = sum(r.params_after for r in summary.rows)
    assert summary.keep_targets == pytest.approx(after / before)
    assert summary.keep_targets <= keep + 1e-9
    assert summary.model_params_before == params_before
    assert summary.model_params_after == sum(p.numel() for p in model.parameters())
    assert params_before - summary.model_params_after == before - after
    assert summary.keep_model == pytest.approx(summary.model_params_after / params_before)
    assert summary.method == method
    assert summary.calib_tokens == (0 if method == "svd" else CALIB.numel())
    table = summary.table()
    assert f"method {method}" in table and rows[spec.targets[0]].name in table

    out = forward(model, TEST_IDS)
    assert out.shape == dense_out.shape
    assert torch.isfinite(out).all()


def find_targets_safe(model):
    try:
        return find_targets(model)
    except ValueError:
        return {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_exact_on_low_rank_weights(arch, method):
    """Weights of rank 3 are reproduced by every method at a rank >= 3: outputs match the dense model."""
    model = ARCHS[arch].build()
    make_low_rank(model, rank=3)
    dense_out = forward(model, TEST_IDS)
    summary = compress_(model, config(method, keep=0.5), calib=CALIB, progress=False)
    assert not summary.dense_targets
    out = forward(model, TEST_IDS)
    # Low-rank weights make some Gram matrices (nearly) singular, e.g. the input of an output projection
    # whose v_proj has rank 3, so whitening is exact only up to a (small) amplified float32 rounding error.
    error = (out - dense_out).norm() / dense_out.norm()
    assert error < 1e-3, error


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_high_keep_is_closer_than_low_keep(arch):
    ids = TEST_IDS
    dense = forward(ARCHS[arch].build(), ids)
    errors = {}
    for keep in (0.2, 0.9):
        model = ARCHS[arch].build()
        compress_(model, config("whiten", keep=keep), calib=CALIB, progress=False)
        errors[keep] = (forward(model, ids) - dense).norm() / dense.norm()
    assert errors[0.9] < errors[0.2]
    assert errors[0.9] < 0.25  # random weights are full rank: keep 0.9 still drops half the spectrum


def test_keep_one_and_large_rank_stay_dense_and_say_so():
    model = ARCHS["llama"].build()
    summary = compress_(model, config("svd", keep=1.0), progress=False)
    for row in summary.rows:
        m, n = row.shape
        if row.rank is None:  # floor(mn/(m+n)) reached break-even (square 32x32: 16 = r*)
            assert "break-even" in row.note
            assert row.params_after == row.params_before
            assert not isinstance(model.get_submodule(row.name), LowRankLinear)
        else:  # floor(r*) < r*: still (barely) smaller than dense
            assert row.rank < break_even_rank(m, n)
            assert row.params_after < row.params_before
    assert "model.layers.0.self_attn.q_proj" in summary.dense_targets  # 32x32: r* = 16 exactly

    model = ARCHS["gpt2"].build()
    dense_out = forward(model, TEST_IDS)
    summary = compress_(model, config("svd", keep=None, rank=1000), progress=False)
    assert len(summary.dense_targets) == len(summary.rows) == 8
    assert all("break-even" in r.note and r.rank is None for r in summary.rows)
    assert summary.keep_targets == 1.0 and summary.keep_model == 1.0
    assert "8 of 8 targets left dense" in summary.table()
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert torch.equal(forward(model, TEST_IDS), dense_out)


def test_rank_at_break_even_minus_one_is_factorised():
    model = ARCHS["llama"].build()
    summary = compress_(model, config("svd", keep=None, rank=15), progress=False)
    rows = {r.name: r for r in summary.rows}
    assert rows["model.layers.0.self_attn.q_proj"].rank == 15  # 32x32, r* = 16
    assert rows["model.layers.0.self_attn.k_proj"].rank is None  # 16x32, r* = 10.67


def test_overrides_apply_per_target():
    model = ARCHS["llama"].build()
    overrides = {"model.layers.0.mlp.up_proj": {"dense": True}, "re:down_proj": {"rank": 2}}
    summary = compress_(model, config("svd", keep=0.5, overrides=overrides), progress=False)
    rows = {r.name: r for r in summary.rows}
    assert rows["model.layers.0.mlp.up_proj"].rank is None and "override" in rows["model.layers.0.mlp.up_proj"].note
    assert rows["model.layers.0.mlp.down_proj"].rank == 2 and rows["model.layers.1.mlp.down_proj"].rank == 2
    assert rows["model.layers.1.mlp.up_proj"].rank == expected_rank(64, 32, 0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_include_exclude_in_compress(arch):
    model = ARCHS[arch].build()
    pattern = "re:q_proj$" if arch == "llama" else "re:c_attn$"
    summary = compress_(model, config("whiten", include=[pattern]), calib=CALIB, progress=False)
    assert len(summary.rows) == 2
    low = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert sorted(low) == sorted(r.name for r in summary.rows)

    model = ARCHS[arch].build()
    summary = compress_(model, config("asvd", exclude=["re:mlp"]), calib=CALIB, progress=False)
    assert summary.rows and not any("mlp" in r.name for r in summary.rows)
    assert not any(isinstance(m, LowRankLinear) for n, m in model.named_modules() if ".mlp." in n)


def test_lm_head_needs_full_model_pass():
    model = ARCHS["llama"].build()
    with pytest.raises(ValueError, match="layerwise=False"):
        compress_(model, config("whiten", include=["lm_head"]), calib=CALIB, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    summary = compress_(model, config("whiten", include=["lm_head"], layerwise=False), calib=CALIB, progress=False)
    assert isinstance(model.lm_head, LowRankLinear) and [r.name for r in summary.rows] == ["lm_head"]
    assert torch.isfinite(forward(model, TEST_IDS)).all()


# --------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_shared_inputs_share_one_statistic(arch):
    spec = ARCHS[arch]
    model = spec.build()
    targets = find_targets(model)
    with torch.no_grad(), StatsCollector(targets, "gram") as stats:
        model(**model_inputs(model, CALIB[:4]))
        model(**model_inputs(model, CALIB[4:]))
    groups = [sorted(g) for g in stats.groups]
    assert sorted(n for g in groups for n in g) == sorted(targets)
    if spec.attn_inputs:
        assert sorted(spec.attn_inputs) in groups
        shared = [stats.stat(n) for n in spec.attn_inputs]
        assert all(s is shared[0] for s in shared)
        assert len(stats.accumulators) < len(targets)
    if arch in ("llama", "mistral", "qwen2"):
        for i in range(2):
            assert [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"] in groups
            assert [f"model.layers.{i}.mlp.down_proj"] in groups
    # each statistic is the Gram matrix of the exact input the layer sees
    name = spec.targets[0]
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**model_inputs(model, CALIB))
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    assert torch.allclose(stats.stat(name), x.T @ x, rtol=1e-6, atol=1e-8)


def test_shared_statistic_gives_same_factors_as_separate_grams():
    """Whitening q/k/v from one shared Gram equals whitening each from its own Gram of the same input."""
    from rankcut.factorize import factorize

    model = ARCHS["llama"].build()
    names = ARCHS["llama"].attn_inputs
    xs = []
    handle = model.get_submodule(names[0]).register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach()))
    with torch.no_grad():
        model(**model_inputs(model, CALIB))
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    compressed = ARCHS["llama"].build()
    compress_(compressed, config("whiten"), calib=CALIB, progress=False)
    got = products(compressed)
    for name in names:
        W = dense_weight(model.get_submodule(name)).detach()
        result = factorize(W, "whiten", {"keep": 0.5}, x.T @ x)
        assert torch.allclose(result.U @ result.V, got[name], atol=1e-5), name


@pytest.mark.parametrize("method", ["asvd", "whiten"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_layerwise_equals_full_model(arch, method):
    a = ARCHS[arch].build()
    b = ARCHS[arch].build()
    compress_(a, config(method, layerwise=True), calib=CALIB, progress=False)
    compress_(b, config(method, layerwise=False), calib=CALIB, progress=False)
    pa, pb = products(a), products(b)
    assert pa.keys() == pb.keys() and len(pa) == ARCHS[arch].n_targets
    for name in pa:
        assert torch.allclose(pa[name], pb[name], atol=1e-5, rtol=1e-4), name
    assert torch.allclose(forward(a, TEST_IDS), forward(b, TEST_IDS), atol=1e-5)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sequential_changes_only_later_blocks(arch):
    a = ARCHS[arch].build()
    b = ARCHS[arch].build()
    compress_(a, config("whiten", keep=0.3, sequential=False), calib=CALIB, progress=False)
    compress_(b, config("whiten", keep=0.3, sequential=True), calib=CALIB, progress=False)
    pa, pb = products(a), products(b)
    first = [n for n in pa if ".0." in n]
    later = [n for n in pa if ".1." in n]
    assert first and later
    for name in first:
        assert torch.allclose(pa[name], pb[name], atol=1e-6), name
    for name in later:
        assert not torch.allclose(pa[name], pb[name], atol=1e-6), name


def test_sequential_needs_layerwise():
    with pytest.raises(ValueError, match="layerwise"):
        CompressConfig(sequential=True, layerwise=False)


@pytest.mark.parametrize("method", ["asvd", "whiten"])
def test_data_aware_methods_need_calibration(method):
    model = ARCHS["llama"].build()
    with pytest.raises(ValueError, match="calib"):
        compress_(model, config(method), progress=False)
    with pytest.raises(ValueError, match="windows"):
        compress_(model, CompressConfig(method=method, calib_samples=64), calib=CALIB, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_non_finite_weight_names_layer_and_leaves_model_unchanged(arch, bad):
    model = ARCHS[arch].build()
    name = "model.layers.1.mlp.up_proj" if arch == "llama" else "transformer.h.1.mlp.c_fc"
    with torch.no_grad():
        model.get_submodule(name).weight[3, 5] = bad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for method in METHODS:
        with pytest.raises(ValueError, match=name.replace(".", "\\.")):
            compress_(model, config(method), calib=CALIB, progress=False)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(torch.nan_to_num(after[key], posinf=7.0), torch.nan_to_num(value, posinf=7.0)), key
    assert not hasattr(model, "rankcut_record")


def test_bad_config_values_are_rejected():
    for kw, match in [
        ({"keep": 0.0}, "keep"), ({"keep": 1.5}, "keep"), ({"energy": 0.0}, "energy"), ({"energy": 1.01}, "energy"),
        ({"rank": 0}, "rank"), ({"method": "nope"}, "unknown method"), ({"options": {"solver": "qr"}}, "unknown solver"),
        ({"keep": 0.5, "rank": 4}, "only one"),
    ]:
        with pytest.raises(ValueError, match=match):
            CompressConfig(**kw)


def test_energy_allocation_and_randomized_solver():
    model = ARCHS["llama"].build()
    make_low_rank(model, rank=3)
    summary = compress_(model, config("svd", keep=None, energy=0.999), progress=False)
    assert all(r.rank == 3 for r in summary.rows), [(r.name, r.rank) for r in summary.rows]
    model = ARCHS["llama"].build()
    make_low_rank(model, rank=3)
    dense = forward(model, TEST_IDS)
    compress_(model, config("whiten", options={"solver": "randomized", "oversample": 2}), calib=CALIB, progress=False)
    assert ((forward(model, TEST_IDS) - dense).norm() / dense.norm()) < 1e-3


def test_factors_are_never_targets_again():
    """A compressed model's U/V factors are not targets: compressing again touches only what stayed dense."""
    model = ARCHS["llama"].build()
    compress_(model, config("svd", keep=0.5, exclude=["re:mlp"]), progress=False)
    remaining = find_targets(model)
    assert sorted(remaining) == sorted(n for n in find_targets(ARCHS["llama"].build()) if ".mlp." in n)
    summary = compress_(model, config("svd", keep=0.5), progress=False)
    assert all(".mlp." in r.name for r in summary.rows)
    assert not any(isinstance(m, LowRankLinear) for layer in model.modules() if isinstance(layer, LowRankLinear)
                   for m in layer.children())
    assert len(model.rankcut_record.ranks) == 14 and len(model.rankcut_record.history) == 1
    with pytest.raises(ValueError, match="no target layers found"):
        compress_(model, config("svd"), progress=False)


def test_record_is_attached():
    model = ARCHS["qwen2"].build()
    summary = compress_(model, config("asvd", keep=0.4), calib=CALIB, progress=False)
    record = model.rankcut_record
    assert record.config["method"] == "asvd" and record.config["keep"] == 0.4 and record.method == "asvd"
    assert record.ranks == {r.name: r.rank for r in summary.rows}
    assert all(e["type"] == "lowrank" for e in record.targets.values())
    assert record.keep_targets == pytest.approx(summary.keep_targets)
    assert rankcut.__version__ == record.rankcut_version


def test_non_finite_non_target_parameter_is_caught_before_any_swap():
    model = ARCHS["llama"].build()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.post_attention_layernorm"):
        compress_(model, config("whiten"), calib=CALIB, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
