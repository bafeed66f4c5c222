"""Fused inference for any loaded model (rankcut.prepare_for_inference) and its exact reversal."""

from __future__ import annotations

import pytest
import torch

import rankcut
from rankcut import CompressConfig, compress_
from rankcut.fuse import is_fused, prepare_for_inference, unfuse
from rankcut.modules.grouped import DenseGroup, LowRankGroup
from tiny_models import ARCHS, forward, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = token_windows(2, seed=99)


def _compressed(arch="llama", **kw):
    model = ARCHS[arch].build()
    compress_(model, CompressConfig(method="svd", keep=0.5, **kw), progress=False)
    return model


def _storages(model):
    return [p.untyped_storage().data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("arch, groups, kind", [("llama", 4, LowRankGroup), ("mistral", 4, LowRankGroup),
                                                ("qwen2", 4, LowRankGroup), ("bert", 2, LowRankGroup)])
def test_fuse_computes_the_same_and_keeps_the_state_dict(arch, groups, kind):
    model = _compressed(arch)
    reference = forward(model, IDS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    assert prepare_for_inference(model) == groups and is_fused(model)
    assert prepare_for_inference(model) == groups  # idempotent
    assert all(isinstance(g, kind) for _, g in model._rankcut_fused)
    torch.testing.assert_close(forward(model, IDS), reference, rtol=1e-5, atol=1e-6)
    assert [type(m) for m in model.modules()] == modules  # same modules
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert len(set(_storages(model))) < len(_storages(model))  # parameters are views of the fused buffers
    unfuse(model)
    assert not is_fused(model) and len(set(_storages(model))) == len(_storages(model))
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(forward(model, IDS), reference)


def test_dense_models_fuse_too():
    model = ARCHS["llama"].build()
    reference = forward(model, IDS)
    assert prepare_for_inference(model) == 4
    assert all(isinstance(g, DenseGroup) for _, g in model._rankcut_fused)
    torch.testing.assert_close(forward(model, IDS), reference, rtol=1e-5, atol=1e-6)
    unfuse(model)


def test_mixed_groups_stay_unfused_and_gpt2_has_nothing_to_fuse():
    model = _compressed("llama", overrides={"model.layers.0.self_attn.k_proj": {"dense": True}})
    assert prepare_for_inference(model) == 3  # block 0's q/k/v mixes dense and low-rank
    unfuse(model)
    assert prepare_for_inference(_compressed("gpt2")) == 0


def test_training_a_fused_model_gives_the_unfused_gradients():
    """With gradients on, the layers compute as before: training is correct (and not fused)."""
    model, twin = _compressed(), _compressed()
    prepare_for_inference(model)
    model.train(), twin.train()
    for m in (model, twin):
        m(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in twin.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7)


def test_load_with_fuse(tmp_path):
    model = _compressed()
    path = rankcut.save(model, tmp_path / "c")
    fused = rankcut.load(path, fuse=True)
    assert is_fused(fused)
    torch.testing.assert_close(forward(fused, IDS), forward(model, IDS), rtol=1e-5, atol=1e-6)
    unfuse(fused)
    assert torch.equal(forward(fused, IDS), forward(model, IDS))
