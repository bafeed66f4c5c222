"""Quality recovery (``rankcut recover``): residual math, merge equivalence, the training loop, resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import rankcut
from rankcut import CompressConfig, LowRankLinear, compress_
from rankcut.adapters import apply_state, attach, initial_state, keep_for_growth, merge, residual_factors
from rankcut.units import uniform_rank
from rankcut.cli import main
from rankcut.config import RecoverConfig
from rankcut.factorize import factorize
from rankcut.linalg import safe_cholesky
from rankcut.methods.asvd import asvd_scales
from rankcut.recover import recover_
from rankcut.train import WorkDir
from tiny_models import ARCHS, forward, sample_text, tiny_tokenizer, token_windows

F64 = torch.float64
IDS = token_windows(2, seed=5)
FAST = dict(lora_rank=4, seq_len=16, batch_size=4, lr=3e-3, eval_windows=4)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    (root / "tune.txt").write_text(sample_text(3000, seed=1))
    (root / "held.txt").write_text(sample_text(1200, seed=2))
    return root


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def compressed(texts, tok, arch: str = "llama", keep: float = 0.5, method: str = "whiten"):
    model = ARCHS[arch].build()
    cfg = CompressConfig(method=method, keep=keep, calib_samples=8, seq_len=16, batch_size=4)
    compress_(model, cfg, calib=str(texts / "tune.txt"), tokenizer=tok, progress=False)
    return model


def ranks(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


# ------------------------------------------------------------------------------------------------ math


def _gram(n: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(200, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    X[:, 0] *= 20  # an outlier channel, as in real activations
    return X.mT @ X


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
@pytest.mark.parametrize("m, n, r, k", [(24, 16, 4, 3), (12, 30, 2, 5)])
def test_residual_directions_extend_the_method_truncation(method, m, n, r, k):
    """[U, B][V; A] is the method's own rank-(r + k) factorisation: Eckart–Young in the method's norm."""
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(m), dtype=F64)
    G = _gram(n)
    stat = {"svd": None, "asvd": (G.diagonal() / 200).sqrt(), "whiten": G}[method]
    small = factorize(W, method, {"rank": r}, stat, svd_dtype=F64)
    B, A, S = residual_factors(W, small.U, small.V, k, method, stat, {"svd_dtype": "float64"})
    assert B.shape == (m, k) and A.shape == (k, n)
    big = factorize(W, method, {"rank": r + k}, stat, svd_dtype=F64)
    grown = torch.cat([small.U, B], 1) @ torch.cat([small.V, A], 0)
    torch.testing.assert_close(grown, big.U @ big.V, rtol=1e-8, atol=1e-8)
    if method == "svd":
        M = torch.eye(n, dtype=F64)
    else:
        M = torch.diag(asvd_scales(stat)) if method == "asvd" else safe_cholesky(G)[0]
    spectrum = torch.linalg.svdvals(W @ M)
    torch.testing.assert_close(S, spectrum[r : r + k], rtol=1e-8, atol=1e-10)
    error = torch.linalg.matrix_norm((W - grown) @ M)
    assert error.item() == pytest.approx(spectrum[r + k :].pow(2).sum().sqrt().item(), rel=1e-8)


def test_factor_alone_cannot_reduce_the_whitened_residual():
    """Why factors-mode residual init is PiSSA: the best correction of U (or V) alone is zero."""
    W = torch.randn(20, 14, generator=torch.Generator().manual_seed(3), dtype=F64)
    G = _gram(14, seed=1)
    L = safe_cholesky(G)[0]
    f = factorize(W, "whiten", {"rank": 4}, G, svd_dtype=F64)
    R = (W - f.U @ f.V) @ L
    dV = torch.linalg.lstsq(f.U, R).solution  # argmin ‖R − U ΔV L‖ in the whitened space
    dU = torch.linalg.lstsq((f.V @ L).mT, R.mT).solution.mT
    assert dV.abs().max() < 1e-9 * R.abs().max() and dU.abs().max() < 1e-9 * R.abs().max()


def test_keep_for_growth_fits_the_budget():
    shapes = [(384, 384), (128, 384), (1024, 384), (384, 1024)]
    for keep in (0.6, 0.8):
        budget = sum(uniform_rank(m, n, keep) * (m + n) for m, n in shapes)
        smaller = keep_for_growth(shapes, keep, 16)
        grown = sum((uniform_rank(m, n, smaller) + 16) * (m + n) for m, n in shapes)
        assert smaller < keep and grown <= budget and grown > 0.97 * budget


# ------------------------------------------------------------------------------------ adapters and merge


def _randomise(handles) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for h in handles.values():
            h.A.copy_(torch.randn(h.A.shape, generator=gen) * 0.1)
            h.B.copy_(torch.randn(h.B.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["factors", "grow"])
def test_merged_logits_equal_unmerged(texts, tok, arch, mode):
    model = compressed(texts, tok, arch)
    before = ranks(model)
    trainable, handles, skipped = attach(model, RecoverConfig(mode=mode, **FAST))
    _randomise(handles)
    unmerged = forward(trainable, IDS)
    merged = merge(trainable, model, RecoverConfig(mode=mode, **FAST))
    assert merged is model
    torch.testing.assert_close(forward(model, IDS), unmerged, rtol=1e-5, atol=1e-5)
    grow = 0 if mode == "factors" else 4
    assert ranks(model) == {n: r + (grow if n not in skipped else 0) for n, r in before.items()}
    assert not any("lora" in key or ".base." in key for key in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


def test_factors_mode_keeps_every_tensor_shape(texts, tok):
    """Same modules, names and shapes after recovery: the recovered model runs exactly as fast."""
    model = compressed(texts, tok)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    recover_(model, tok, str(texts / "tune.txt"), RecoverConfig(steps=3, **FAST), device="cpu", progress=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert {n: type(m) for n, m in model.named_modules()} == types


@pytest.mark.parametrize("mode", ["factors", "grow"])
def test_residual_init_start(texts, tok, mode):
    """PiSSA (factors) leaves the function unchanged; grow adds the next residual directions of W L."""
    dense, model = ARCHS["llama"].build(), compressed(texts, tok)
    reference = forward(model, IDS)
    config = RecoverConfig(mode=mode, init="residual", **FAST)
    trainable, handles, _ = attach(model, config)
    residual = None
    if mode == "grow":
        from rankcut.recover import residual_init

        residual, info = residual_init(model, list(handles), dense, tok, str(texts / "tune.txt"), 4, torch.device("cpu"), False)
        assert info["method"] == "whiten" and info["statistics"]["same_source_as_compression"]
    apply_state(handles, initial_state(handles, config, residual))
    if mode == "factors":
        torch.testing.assert_close(forward(trainable, IDS), reference, rtol=1e-4, atol=1e-4)
        return
    # the merged start equals compressing the dense model directly at rank r + 4
    merge(trainable, model, config)
    direct = ARCHS["llama"].build()
    overrides = {name: {"rank": r} for name, r in ranks(model).items()}
    compress_(direct, CompressConfig(method="whiten", calib_samples=8, seq_len=16, batch_size=4, overrides=overrides),
              calib=str(texts / "tune.txt"), tokenizer=tok, progress=False)
    torch.testing.assert_close(forward(model, IDS), forward(direct, IDS), rtol=1e-3, atol=1e-3)


class _OneLayer(torch.nn.Module):
    """One LowRankLinear with random factors (U's columns scaled over two decades), stored in ``dtype``."""

    def __init__(self, m: int, n: int, rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(m * n + rank)
        U = torch.randn(m, rank, generator=gen) * torch.logspace(0, -2, rank)
        self.layer = LowRankLinear.from_factors(U, torch.randn(rank, n, generator=gen), dtype=dtype)


def _both_pissa_starts(m, n, rank, lora_rank, lora_alpha, dtype):
    """rankcut's factors + residual start and PEFT's ``init_lora_weights="pissa"`` on the same factors: per
    factor, its weight before, the scale, and each start's adapter ``(A, B)`` and frozen weight."""
    import peft

    config = RecoverConfig(mode="factors", init="residual", lora_rank=lora_rank, lora_alpha=lora_alpha)
    ours = _OneLayer(m, n, rank, dtype)
    before = {f"layer.{c}": getattr(ours.layer, c).weight.detach().float().clone() for c in ("V", "U")}
    _, handles, _ = attach(ours, config)
    apply_state(handles, initial_state(handles, config))
    lora = peft.LoraConfig(r=lora_rank, lora_alpha=lora_rank * config.scaling, target_modules=list(handles),
                           init_lora_weights="pissa")
    theirs = peft.get_peft_model(_OneLayer(m, n, rank, dtype), lora).base_model.model
    out = {}
    for name, h in handles.items():
        wrapped = theirs.get_submodule(name)
        assert wrapped.scaling["default"] == h.scaling == config.scaling
        assert wrapped.lora_A["default"].out_features == lora_rank  # even where it holds fewer rows (below)
        peft_start = (wrapped.lora_A["default"].weight.detach(), wrapped.lora_B["default"].weight.detach(),
                      wrapped.base_layer.weight.detach())
        out[name] = before[name], h.scaling, (h.A.detach(), h.B.detach(), h.base.detach()), peft_start
    return out


@pytest.mark.parametrize("m, n, rank, lora_rank, lora_alpha", [
    (24, 16, 6, 4, None), (30, 70, 10, 4, 2.0),  # scale 1 and 1/2: bit for bit
    (64, 48, 12, 8, 3.0), (40, 30, 8, 6, 2.1),  # scale 3/8 and 0.35: the shifted weight to float32 rounding
    (40, 30, 8, 16, None), (40, 30, 8, 16, 5.0),  # fewer singular directions (8) than the adapter rank (16)
])
def test_factors_residual_start_against_peft_pissa_float32(m, n, rank, lora_rank, lora_alpha):
    """On float32 factors PEFT's PiSSA init gives rankcut's adapters bit for bit, and the same shifted frozen
    factor up to the order of one multiplication: PEFT subtracts ``(s·B) A``, rankcut ``s·(B A)`` (identical
    when ``s`` is a power of two; otherwise apart by up to 1.3 ε·max|W| here, 2.5 ε at 512×96, k = 16).

    With fewer singular directions k than the adapter rank r PEFT gives a rank-k adapter (A k×in, B out×k)
    inside modules that still say r; rankcut keeps r rows, the first k PiSSA's and the rest LoRA's default
    (B zero, A random), so the function is unchanged and the adapter has the configured size."""
    for name, (W0, s, (A, B, W), (pA, pB, pW)) in _both_pissa_starts(m, n, rank, lora_rank, lora_alpha,
                                                                    torch.float32).items():
        k = min(rank, lora_rank)
        assert pA.shape == (k, W0.shape[1]) and pB.shape == (W0.shape[0], k)
        assert A.shape == (lora_rank, W0.shape[1]) and B.shape == (W0.shape[0], lora_rank)
        assert torch.equal(A[:k], pA) and torch.equal(B[:, :k], pB), name
        assert not B[:, k:].any() and (k == lora_rank or A[k:].abs().min() > 0)
        assert torch.equal(pW, W0 - (s * pB) @ pA), name  # PEFT's order, from the same adapter
        if math.frexp(s)[0] == 0.5:
            assert torch.equal(W, pW), name
        else:
            assert (W - pW).abs().max() <= 4 * torch.finfo(torch.float32).eps * W0.abs().max(), name
        torch.testing.assert_close(W + s * B @ A, W0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, rank, lora_rank", [(64, 48, 12, 8), (40, 30, 8, 16)])
def test_peft_pissa_rounds_half_precision_adapters_after_the_shift(dtype, m, n, rank, lora_rank):
    """Why rankcut keeps its own PiSSA code: on bf16/fp16 factors PEFT shifts the frozen factor by the float32
    adapters, then rounds the adapters to the factor's dtype (PEFT upcasts them to float32 again later), so
    ``W' + s·B A`` is off W by the rounding of the principal part. rankcut keeps the float32 adapters, and
    only the frozen remainder ``W − s·B A`` is rounded: its start error in ``W' + s·B A`` was 1.3–44× smaller
    on random factors up to 512×96, and ~1e-9 against PEFT's ~5e-3 where the adapter takes every direction."""
    for name, (W0, s, (A, B, W), (pA, pB, pW)) in _both_pissa_starts(m, n, rank, lora_rank, None, dtype).items():
        k = min(rank, lora_rank)
        A, B = A[:k], B[:, :k]  # rankcut's float32 adapter: the exact top-k split
        assert pA.dtype == pB.dtype == torch.float32
        assert torch.equal(pA, A.to(dtype).float()) and torch.equal(pB, B.to(dtype).float()), name
        assert not torch.equal(pA, A)
        assert torch.equal(W, (W0 - s * (B @ A)).to(dtype)) and torch.equal(pW, (W0 - (s * B) @ A).to(dtype)), name
        ours = (W.float() + s * B @ A - W0).abs().max()
        peft_error = (pW.float() + s * pB @ pA - W0).abs().max()
        remainder = torch.finfo(dtype).eps * (W0 - s * B @ A).abs().max()  # rounding the frozen remainder
        assert ours <= remainder + 4 * torch.finfo(torch.float32).eps * W0.abs().max(), name
        assert peft_error > 1.5 * ours, name


def test_grow_skips_layers_that_would_reach_break_even(texts, tok):
    model = compressed(texts, tok, keep=0.9)
    _, handles, skipped = attach(model, RecoverConfig(mode="grow", lora_rank=2))
    assert skipped and not set(skipped) & set(handles)
    assert all("break-even" in why for why in skipped.values())


# ----------------------------------------------------------------------------------------- training loop


@pytest.fixture(scope="module")
def trained(texts, tok):
    """A tiny Llama trained briefly on the tuning text (~1 s), so compression costs it real quality."""
    from rankcut.data import token_stream

    model = ARCHS["llama"].build()
    ids = token_stream(str(texts / "tune.txt"), tok)
    windows = ids[: ids.numel() // 16 * 16].view(-1, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        batch = windows[torch.randint(0, windows.shape[0], (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_perplexity_falls_after_a_few_hundred_steps(texts, tok, trained):
    import copy

    held = str(texts / "held.txt")
    dense_ppl = rankcut.perplexity(trained, tok, held, seq_len=16, max_windows=16, progress=False)
    model = copy.deepcopy(trained)
    compress_(model, CompressConfig(method="whiten", keep=0.5, calib_samples=8, seq_len=16, batch_size=4),
              calib=str(texts / "tune.txt"), tokenizer=tok, progress=False)
    config = RecoverConfig(steps=200, eval_every=50, **{**FAST, "batch_size": 8, "eval_windows": 16})
    result = recover_(model, tok, str(texts / "tune.txt"), config, eval_text=held, device="cpu", progress=False)
    history = [ppl for _, ppl in result.record["eval"]["history"]]
    compressed_ppl = result.record["eval"]["compressed"]
    assert history[0] == pytest.approx(compressed_ppl, rel=1e-6)  # zero init: the model starts as compressed
    assert compressed_ppl > 1.2 * dense_ppl  # compression cost real quality...
    assert len(history) == 5 and all(b < a for a, b in zip(history, history[1:]))  # ...falling at every check
    assert result.record["eval"]["after"] < compressed_ppl - 0.5 * (compressed_ppl - dense_ppl)  # half won back
    assert result.record["eval"]["after"] == pytest.approx(history[-1], rel=1e-5)  # merged = trained adapters
    assert result.record["loss_last10"] < result.record["loss_first"]
    assert result.record["tokens_tuned"] == 200 * 8 * 16


def _interrupt_at(stop: int):
    def on_step(step: int) -> None:
        if step == stop:
            raise KeyboardInterrupt

    return on_step


def _run(texts, tok, config, work=None, on_step=None, mode_dense=False, restart=False, device="cpu"):
    model = compressed(texts, tok)
    dense = ARCHS["llama"].build() if mode_dense else None
    result = recover_(model, tok, str(texts / "tune.txt"), config, eval_text=str(texts / "held.txt"), dense=dense,
                      work_dir=work, restart=restart, on_step=on_step, device=device, progress=False)
    return model, result


@pytest.mark.parametrize("mode, init", [("factors", "residual"), ("grow", "residual"), ("factors", "zero")])
def test_interrupted_run_resumes_to_the_same_model(texts, tok, tmp_path, mode, init):
    config = RecoverConfig(mode=mode, init=init, steps=10, save_every=4, eval_every=5, lora_dropout=0.1, **FAST)
    dense = mode == "grow"
    straight, _ = _run(texts, tok, config, mode_dense=dense)

    with pytest.raises(KeyboardInterrupt):
        _run(texts, tok, config, tmp_path / "work", _interrupt_at(7), dense)
    assert (tmp_path / "work" / "state.pt").is_file()
    resumed, result = _run(texts, tok, config, tmp_path / "work", mode_dense=dense)
    assert result.record["resumed_from"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [s for s, _ in result.record["eval"]["history"]] == [0, 5, 10]


def test_work_folder_with_other_settings_is_refused(texts, tok, tmp_path):
    config = RecoverConfig(steps=4, save_every=2, **FAST)
    with pytest.raises(KeyboardInterrupt):
        _run(texts, tok, config, tmp_path / "w", _interrupt_at(3))
    other = RecoverConfig(steps=4, save_every=2, **{**FAST, "lr": 1e-3})
    with pytest.raises(ValueError, match="other settings"):
        _run(texts, tok, other, tmp_path / "w")
    _, result = _run(texts, tok, other, tmp_path / "w", restart=True)
    assert result.record["resumed_from"] is None
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(ValueError, match="not a rankcut recover work folder"):
        WorkDir(tmp_path / "junk", {}).check()


def test_seed_determines_the_result(texts, tok):
    a, _ = _run(texts, tok, RecoverConfig(steps=3, **FAST))
    b, _ = _run(texts, tok, RecoverConfig(steps=3, **FAST))
    c, _ = _run(texts, tok, RecoverConfig(steps=3, seed=1, **FAST))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("change", [dict(batch_size=2, grad_accum=2), dict(gradient_checkpointing=True)])
def test_accumulation_and_checkpointing_do_not_change_training(texts, tok, change):
    base = {**FAST, "steps": 4}
    a, _ = _run(texts, tok, RecoverConfig(**base))
    b, _ = _run(texts, tok, RecoverConfig(**{**base, **change}))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_recomputes_the_blocks(texts, tok, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or original(self, x))
    counts = []
    for checkpointing in (False, True):
        calls.clear()
        _run(texts, tok, RecoverConfig(steps=1, gradient_checkpointing=checkpointing, **FAST))
        counts.append(len(calls))
    assert counts[1] - counts[0] == 2  # 2 blocks, 1 step: each block's MLP runs once more, in the backward pass


def test_distillation_loss(texts, tok, trained):
    """KL to an identical teacher is zero; the mixed loss weights the next-token loss by 1 − distill."""
    from rankcut.train import step_loss

    ids = token_windows(3, seed=9)
    with torch.no_grad():
        assert step_loss(trained, ids, 1.0, trained).item() == pytest.approx(0.0, abs=1e-6)
        ce = step_loss(trained, ids).item()
        assert step_loss(trained, ids, 0.25, trained).item() == pytest.approx(0.75 * ce, rel=1e-5)
    model = compressed(texts, tok)
    with pytest.raises(ValueError, match="teacher"):
        recover_(model, tok, str(texts / "tune.txt"), RecoverConfig(distill=0.5, **FAST))
    _, result = _run(texts, tok, RecoverConfig(steps=3, distill=1.0, **FAST), mode_dense=True)
    assert result.record["loss"] == {"next_token": 0.0, "distill_from_dense": 1.0}


def test_bf16_autocast_trains_on_cpu(texts, tok):
    _, result = _run(texts, tok, RecoverConfig(steps=3, precision="bf16", **FAST))
    assert all(torch.isfinite(torch.tensor(x)) for x in result.record["losses"])


def test_encoders_are_refused(texts, tok):
    model = ARCHS["bert"].build()
    compress_(model, CompressConfig(method="svd", keep=0.5), progress=False)
    with pytest.raises(ValueError, match="not a causal LM"):
        recover_(model, tok, str(texts / "tune.txt"), RecoverConfig(**FAST))


def test_held_out_text_may_not_be_tuning_data(texts, tok, tmp_path):
    model = compressed(texts, tok)
    copy = tmp_path / "copy.txt"
    copy.write_text((texts / "tune.txt").read_text())
    for evaluation in (texts / "tune.txt", copy):
        with pytest.raises(ValueError, match="also tuning data"):
            recover_(model, tok, str(texts / "tune.txt"), RecoverConfig(**FAST), eval_text=str(evaluation))


# ----------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mode", ["factors", "grow"])
def test_recovered_checkpoint_loads_through_both_paths(texts, tok, tmp_path, mode):
    model, result = _run(texts, tok, RecoverConfig(mode=mode, steps=3, **FAST))
    path = rankcut.save(model, tmp_path / "ckpt", tokenizer=tok)
    manifest = json.loads((path / "rankcut.json").read_text())
    assert {name: e["rank"] for name, e in manifest["targets"].items()} == ranks(model)
    recovery = manifest["recovery"]
    assert recovery["data"][0]["source"] == "tune" and recovery["tokens_tuned"] == 3 * 4 * 16
    assert recovery["eval"]["source"] == "held" and recovery["mode"] == mode
    for loaded in (rankcut.load(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert ranks(loaded) == ranks(model)
        torch.testing.assert_close(forward(loaded, IDS), forward(model, IDS), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def ckpt(texts, tok):
    from tiny_models import save_tiny

    dense = save_tiny(texts / "dense", "llama")
    out = texts / "compressed"
    assert main(["compress", str(dense), "--keep", "0.5", "--calib", str(texts / "tune.txt"), "--calib-samples", "8",
                 "--seq-len", "16", "--quiet", "-o", str(out)]) == 0
    return out


CLI_FAST = ["--device", "cpu", "--lora-rank", "4", "--seq-len", "16", "--batch-size", "4", "--lr", "3e-3", "--eval-windows", "4", "--quiet"]


def test_cli_recover_then_eval(texts, ckpt, tmp_path, capsys):
    out = tmp_path / "rec"
    code = main(["recover", str(ckpt), "--data", str(texts / "tune.txt"), "--eval", str(texts / "held.txt"),
                 "--mode", "grow", "--init", "residual", "--dense", str(texts / "dense"), "--steps", "5", *CLI_FAST,
                 "-o", str(out), "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "tuned on: tune" in printed and "held-out perplexity on held" in printed and "ranks +4" in printed
    assert not (tmp_path / ".rec.recover-work").exists()
    record = json.loads((tmp_path / "r.json").read_text())["recovery"]
    assert record["residual_init"]["statistics"]["source"] == "tune"
    assert record["loss"] == {"next_token": 0.0, "distill_from_dense": 1.0}  # --dense given: distillation by default
    assert main(["eval", str(out), "--ppl", str(texts / "held.txt"), "--ppl", str(texts / "tune.txt"),
                 "--seq-len", "16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "tuned by rankcut recover on tune" in printed and "looks like tuning data" in printed


def test_cli_without_dense_trains_on_next_tokens_and_says_so(texts, ckpt, tmp_path, capsys):
    code = main(["recover", str(ckpt), "--data", str(texts / "tune.txt"), "--steps", "2", *CLI_FAST,
                 "-o", str(tmp_path / "rec"), "--json", str(tmp_path / "r.json")])
    assert code == 0
    assert "note: next-token loss on the tuning text only" in capsys.readouterr().out
    record = json.loads((tmp_path / "r.json").read_text())["recovery"]
    assert record["loss"] == {"next_token": 1.0, "distill_from_dense": 0.0}
    assert record["config"]["lr"] == 3e-3 and record["config"]["distill"] == 0.0


@pytest.mark.parametrize("extra, match", [
    (["--steps", "0"], "steps must be"),
    (["--lora-rank", "0"], "lora_rank must be"),
    (["--lr", "-1"], "lr must be"),
    (["--lora-dropout", "1"], "lora_dropout"),
    (["--precision", "fp16"], "fp16 autocast needs a CUDA"),
    (["--mode", "grow", "--init", "residual"], "needs --dense"),
    (["--distill", "0.5"], "--distill needs --dense"),
    (["--distill", "2"], "distill must be in [0, 1]"),
    (["--eval", "TUNE"], "also tuning data"),
    (["--data", "missing.txt"], "no such file"),
])
def test_cli_bad_input_writes_nothing(texts, ckpt, tmp_path, capsys, extra, match):
    extra = [str(texts / "tune.txt") if x == "TUNE" else x for x in extra]
    code = main(["recover", str(ckpt), "--data", str(texts / "tune.txt"), *CLI_FAST, *extra, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "rankcut: error:" in err and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_missing_non_checkpoint_and_existing_output(texts, ckpt, tmp_path, capsys):
    data = ["--data", str(texts / "tune.txt")]
    for source, match in ((tmp_path / "nope", "does not exist"), (texts / "dense", "not a rankcut checkpoint")):
        assert main(["recover", str(source), *data, "-o", str(tmp_path / "o")]) == 2
        assert match in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert main(["recover", str(ckpt), *data, "-o", str(tmp_path / "o")]) == 2
    assert "exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["o"] and not any((tmp_path / "o").iterdir())


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("precision, checkpointing", [("auto", False), ("bf16", True), ("fp16", False)])
def test_gpu_autocast_recovers(texts, tok, trained, precision, checkpointing):
    """On CUDA with bf16 / fp16 autocast (fp16 with a gradient scaler), gradient checkpointing: held-out
    perplexity falls, and the merged model on the CPU computes what it computed on the GPU."""
    import copy

    model = copy.deepcopy(trained)
    compress_(model, CompressConfig(method="whiten", keep=0.5, calib_samples=8, seq_len=16, batch_size=4),
              calib=str(texts / "tune.txt"), tokenizer=tok, progress=False)
    config = RecoverConfig(steps=120, eval_every=60, precision=precision, gradient_checkpointing=checkpointing,
                           **{**FAST, "batch_size": 8, "eval_windows": 16})
    result = recover_(model, tok, str(texts / "tune.txt"), config, eval_text=str(texts / "held.txt"),
                      device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    ev = result.record["eval"]
    assert ev["after"] < 0.9 * ev["compressed"]
    assert result.record["config"]["precision"] == precision
    with torch.no_grad():
        on_gpu = forward(model, IDS.cuda()).float().cpu()
        on_cpu = forward(model.cpu(), IDS)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_interrupted_run_resumes(texts, tok, tmp_path):
    """CUDA RNG state and optimizer state survive an interruption (dropout draws on the GPU)."""
    config = RecoverConfig(steps=10, save_every=4, eval_every=5, lora_dropout=0.1, **FAST)
    straight, _ = _run(texts, tok, config, device="cuda")
    with pytest.raises(KeyboardInterrupt):
        _run(texts, tok, config, tmp_path / "work", _interrupt_at(7), device="cuda")
    resumed, result = _run(texts, tok, config, tmp_path / "work", device="cuda")
    assert result.record["resumed_from"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
