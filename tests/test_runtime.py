"""Runtime activation decomposition (D-com): products, FLOP counts, outliers, the transform and its plan."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import rankcut
from rankcut.dcom import apply_linear, decompose, flops, outlier_mask, plan_order
from rankcut.runtime import RuntimePlan, apply_runtime, calibrate_thresholds, extracted_fractions, remove_runtime
from tiny_models import forward, llama, token_windows

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = token_windows(2, seed=99)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("S,H,O,k,r", [(64, 48, 40, 5, None), (64, 48, 40, 5, 12), (8, 48, 200, 3, 10)])
def test_flop_formulas_match_pytorchs_count_and_the_order_is_the_cheaper(S, H, O, k, r):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(1, S, H, generator=gen, dtype=torch.float64)
    f = decompose(X, k, solver="exact")
    if r is None:
        W = torch.randn(O, H, generator=gen, dtype=torch.float64)
        counted = _counted(lambda: apply_linear(f, weight=W))
        assert counted == flops("input", S, H, O, k) - k * O  # the Σ scaling is folded into U here
        assert torch.allclose(apply_linear(f, weight=W), (f["U"] @ f["Vh"]) @ W.mT, atol=1e-10)
        return
    V_w = torch.randn(r, H, generator=gen, dtype=torch.float64)
    U_w = torch.randn(O, r, generator=gen, dtype=torch.float64)
    order = plan_order(S, H, O, k, r)
    other = "input+weight-late" if order == "input+weight" else "input+weight"
    assert flops(order, S, H, O, k, r) <= flops(other, S, H, O, k, r)
    counted = _counted(lambda: apply_linear(f, V_w=V_w, U_w=U_w))
    assert counted == flops(order, S, H, O, k, r) - k * r
    assert torch.allclose(apply_linear(f, V_w=V_w, U_w=U_w), (f["U"] @ f["Vh"]) @ V_w.mT @ U_w.mT, atol=1e-9)
    W = U_w @ V_w
    assert flops("dense", S, H, O, k) == _counted(lambda: X[0] @ W.mT)


def test_a_planted_outlier_channel_is_found_and_kept_exact():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2, 32, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 2, 24, generator=gen,
                                                                                 dtype=torch.float64)
    X[:, :, 7] = 100 * torch.randn(2, 32, generator=gen, dtype=torch.float64)  # a planted outlier channel
    mask = outlier_mask(X, 50.0)
    assert mask[:, 7].all() and mask.sum() == 2
    f = decompose(X, 2, threshold=50.0)
    assert torch.equal(f["X_out"][..., 7], X[..., 7]) and f["fraction"] == pytest.approx(1 / 24)
    W = torch.randn(10, 24, generator=gen, dtype=torch.float64)
    exact = X @ W.mT
    assert torch.allclose(apply_linear(f, weight=W), exact, atol=1e-8)  # the rest is rank 2: exact
    without = apply_linear(decompose(X, 2), weight=W)
    assert (without - exact).norm() > 1e-2 * exact.norm()


def test_full_rank_without_outliers_equals_the_dense_model():
    model = llama()
    ref = forward(model, IDS)
    apply_runtime(model, RuntimePlan(layers=[0, 1], rank=16))  # 16 tokens: rank 16 is exact
    assert torch.allclose(forward(model, IDS), ref, atol=1e-4)
    low = RuntimePlan(layers=[1], rank=2)
    apply_runtime(model, low)
    assert not torch.allclose(forward(model, IDS), ref, atol=1e-3)
    remove_runtime(model)
    assert torch.equal(forward(model, IDS), ref)


def test_thresholds_extract_the_asked_fraction_and_are_counted():
    model = llama()
    plan = calibrate_thresholds(model, RuntimePlan(layers=[1], rank=4, outlier_fraction=0.1), token_windows(8))
    assert set(plan.thresholds) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj"}
    apply_runtime(model, plan)
    forward(model, token_windows(8))  # the calibration windows themselves: about 10 % on average
    fractions = extracted_fractions(model)
    assert set(fractions) >= set(plan.thresholds)
    assert all(0.05 <= f <= 0.15 for f in fractions.values())


def test_plan_saves_and_reloads_through_both_paths(tmp_path):
    model = llama()
    calib = token_windows(8)
    plan = RuntimePlan(layers=[1], rank=4, mode="input+weight", outlier_fraction=0.05)
    rankcut.compress_(model, rankcut.CompressConfig(method="whiten", keep=0.8, calib_samples=8, seq_len=16),
                      calib=calib, progress=False, runtime=plan)
    assert model.rankcut_record.runtime["activation_decomposition"]["thresholds"]
    ref = forward(model, IDS)
    rankcut.save(model, tmp_path / "ck")
    for loaded in (rankcut.load(tmp_path / "ck"), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")):
        assert loaded.rankcut_record.runtime["activation_decomposition"] == plan.to_json()
        assert torch.allclose(forward(loaded, IDS), ref, atol=1e-5)


def test_bad_plans_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="outlier_fraction must be in"):
        RuntimePlan(layers=[1], rank=4, outlier_fraction=-0.1)
    with pytest.raises(ValueError, match="mode must be one of"):
        RuntimePlan(layers=[1], rank=4, mode="output")
    model = llama()
    with pytest.raises(ValueError, match=r"block\(s\) \[7\] do not exist"):
        apply_runtime(model, RuntimePlan(layers=[7], rank=4))
    with pytest.raises(ValueError, match="input\\+weight needs rankcut low-rank layers"):
        apply_runtime(model, RuntimePlan(layers=[1], rank=4, mode="input+weight"))
    assert not any(hasattr(m, "_rankcut_runtime") for m in model.modules())  # nothing half-applied
    apply_runtime(model, RuntimePlan(layers=[1], rank=17))
    with pytest.raises(ValueError, match="rank 17 needs prompts of at least that many tokens"):
        forward(model, IDS)
    # the CLI refuses a rank above the evaluation window before evaluating
    from rankcut.cli import main
    from tiny_models import sample_text, save_tiny

    path = save_tiny(tmp_path / "m")
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [1], "rank": 64}))
    (tmp_path / "t.txt").write_text(sample_text(500))
    code = main(["eval", str(path), "--ppl", str(tmp_path / "t.txt"), "--seq-len", "16", "--runtime-plan",
                 str(tmp_path / "plan.json"), "--device", "cpu"])
    assert code != 0


@pytest.mark.parametrize("outliers", [0.0, 0.1])
def test_decomposed_preserved_attention_equals_the_plain_runtime(outliers):
    """The value path kept factored through attention into o_proj computes what the plain transform computes."""
    model = llama()
    ref = forward(model, IDS)
    plan = calibrate_thresholds(model, RuntimePlan(layers=[1], rank=3, outlier_fraction=outliers), token_windows(8))
    apply_runtime(model, plan)
    plain = forward(model, IDS)
    preserved_plan = RuntimePlan(**{**plan.to_json(), "preserve": True})
    apply_runtime(model, preserved_plan)
    assert torch.allclose(forward(model, IDS), plain, atol=1e-4)
    attn = model.model.layers[1].self_attn
    assert attn.q_proj._rankcut_runtime.calls > 0 and attn.v_proj._rankcut_runtime.calls == 0  # no values formed
    assert not torch.allclose(plain, ref, atol=1e-3)
    # full rank: the dense model
    apply_runtime(model, RuntimePlan(layers=[0, 1], rank=16, preserve=True))
    assert torch.allclose(forward(model, IDS), ref, atol=1e-4)
    remove_runtime(model)
    assert torch.equal(forward(model, IDS), ref)


def test_preserve_needs_llama_attention():
    from tiny_models import gpt2

    with pytest.raises(ValueError, match="preserve needs Llama-family attention"):
        apply_runtime(gpt2(), RuntimePlan(layers=[1], rank=4, preserve=True))
