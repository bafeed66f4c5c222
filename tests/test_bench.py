"""Decode benchmark: rankcut's decode step equals the Hugging Face forward; cost model; the CLI (CPU), and
the CUDA-graph loop on the GPU (``gpu`` marker)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import rankcut
from rankcut import cost
from rankcut.bench.decode import make_decoder
from rankcut.bench.loop import DecodeLoop, time_decode
from rankcut.bench.models import preset_config, random_lowrank_, random_model, target_bytes, weight_bytes
from rankcut.bench import run
from rankcut.cli import main
from rankcut.modules import LowRankLinear
from tiny_models import gpt2, llama, mistral, qwen2

pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("build", [llama, mistral, qwen2, gpt2], ids=["llama-gqa", "mistral", "qwen2-bias", "gpt2"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_decode_step_matches_hf_forward(build, lowrank):
    """Prefill 5 tokens, then 3 single-token steps: each step's logits equal the HF full-sequence forward."""
    model = build()
    if lowrank:
        random_lowrank_(model, 0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    full = _hf_logits(model, ids)
    dec = make_decoder(model, batch=2, max_len=12)
    with torch.no_grad():
        pos = torch.zeros(1, dtype=torch.long)
        got = [dec.forward(ids[:, :5], pos)]
        for t in range(5, 8):
            got.append(dec.forward(ids[:, t:t + 1], torch.tensor([t])))
    for t, logits in zip(range(4, 8), got):
        torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_decode_loop_eager_is_greedy_generation():
    model = llama()
    dec = make_decoder(model, batch=1, max_len=10)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    loop = DecodeLoop(dec, prompt, new_tokens=5, use_graph=False)
    with torch.no_grad():
        loop.prefill()
        loop.run_steps()
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert loop.tokens[0].tolist() == ref[0, 4:].tolist()


def test_time_decode_reports_fields():
    dec = make_decoder(llama(), batch=1, max_len=8)
    out = time_decode(dec, torch.zeros(1, 4, dtype=torch.long), new_tokens=3, repeats=2)
    assert out["tokens_per_s"] > 0 and len(out["decode_s"]) == 2 and not out["cuda_graph"]
    assert out["energy_j_per_token"] is None and out["peak_memory_bytes"] is None


def test_unsupported_architecture():
    from tiny_models import opt

    with pytest.raises(ValueError, match="supports the Llama family"):
        make_decoder(opt(), 1, 8)


def test_random_lowrank_and_bytes():
    model = llama()
    dense_bytes = weight_bytes(model)
    emb = model.model.embed_tokens.weight
    assert dense_bytes == sum(p.numel() * 4 for p in model.parameters()) - emb.numel() * 4
    ranks = random_lowrank_(model, 0.5)
    assert len(ranks) == 14 and all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks)
    q = model.model.layers[0].self_attn.q_proj
    assert q.rank == int(0.5 * 32 * 32 / 64)
    dense_t, now_t = target_bytes(model)
    assert now_t < 0.55 * dense_t and weight_bytes(model) == dense_bytes - (dense_t - now_t)
    tied = gpt2()  # wte is the LM head: counted once; wpe is a table read one row at a time
    wte, wpe = tied.transformer.wte.weight, tied.transformer.wpe.weight
    assert weight_bytes(tied) == sum(p.numel() * 4 for p in tied.parameters()) - wpe.numel() * 4
    assert wte.data_ptr() == tied.lm_head.weight.data_ptr()
    with pytest.raises(ValueError, match="keep"):
        random_lowrank_(model, 1.5)


def test_presets_and_random_model():
    cfg = preset_config("llama3-8b", layers=2)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers) == (8, 14336, 128256, 2)
    tiny = random_model(preset_config("tiny-llama"), torch.bfloat16, "cpu")
    assert next(tiny.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown model shape"):
        preset_config("llama9")


def test_cost_model():
    p = cost.DeviceProfile("test", dense_points=((0.0, 2e-6), (1e6, 3e-6)), dense_bw=4e12, p1_floor=1e-6, p1_bw=3e12,
                           p2_floor=1e-6, p2_bw=2e12, glue=2e-6)
    assert cost.dense_bytes_time(5e5, p) == pytest.approx(2.5e-6)  # interpolated
    assert cost.dense_time(4096, 4096, 1, p) == pytest.approx(3e-6 + (4096 * 4096 * 2 - 1e6) / 4e12)  # extrapolated
    assert cost.lowrank_time(4096, 4096, 512, 1, p) == pytest.approx(2e-6 + 512 * 4096 * 2 / 3e12 + 4096 * 512 * 2 / 2e12)
    rows = [("m.l.0.q_proj", 64, 32, 8), ("m.l.0.k_proj", 16, 32, 4), ("m.l.0.v_proj", 16, 32, None), ("m.l.0.o_proj", 32, 32, 4)]
    assert sorted(len(u) for u in cost.launch_units(rows)) == [1, 1, 1, 1]  # q/k/v mixed: separate launches
    rows[2] = ("m.l.0.v_proj", 16, 32, 4)
    assert sorted(len(u) for u in cost.launch_units(rows)) == [1, 3]
    step = cost.decode_time(rows, (300, 32), glue_kernels=10, kv_bytes=0, profile=p)
    assert step["total_s"] == pytest.approx(step["targets_s"] + step["head_s"] + 10 * 2e-6)
    sdpa = cost.decode_time(rows, None, glue_kernels=10, kv_bytes=8e6, profile=p)
    assert sdpa["attention_s"] == pytest.approx(8e6 / 4e12)  # the KV cache at the dense bandwidth
    split = cost.decode_time(rows, None, glue_kernels=10, kv_bytes=8e6, profile=p, attention=(2, 4))
    assert split["attention_s"] == pytest.approx(2 * (p.attn_floor + 4 * p.attn_per_group) + 8e6 / p.attn_bw)
    assert split["total_s"] == pytest.approx(split["targets_s"] + 10 * 2e-6 + split["attention_s"])
    big = [(f"l.{i}.mlp.down_proj", 4096, 11008, 1492) for i in range(32)]
    assert cost.speedup_warning(big) is None  # keep 0.5 of 7B-sized matrices: faster
    near = [(f"l.{i}.mlp.down_proj", 4096, 11008, 2980) for i in range(32)]
    assert "cannot speed up" in cost.speedup_warning(near)  # just below break-even: no bytes saved
    small = [(f"l.{i}.mlp.down_proj", 64, 128, 21) for i in range(4)]
    assert "cannot speed up" in cost.speedup_warning(small)  # launch-bound toy matrices
    assert cost.speedup_warning([("a", 64, 64, None)]) is None  # nothing factorised


def test_compress_warns_when_no_speedup(caplog, monkeypatch):
    model = llama()
    monkeypatch.setattr(cost, "_warned", [False])  # once per process: an earlier compression may have used it
    with caplog.at_level(logging.WARNING, logger="rankcut.cost"):
        rankcut.compress_(model, rankcut.CompressConfig(method="svd", keep=0.5), progress=False)
    assert "cannot speed up batch-1 decoding" in caplog.text


def test_cli_bench_cpu_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "random:tiny-llama", "--compare", "random:tiny-llama", "--random-lowrank", "0.5", "--device",
                 "cpu", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--quiet", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["model"]["low_rank_targets"] == 14 and data["baseline"]["low_rank_targets"] == 0
    assert data["comparison"]["bound"] == pytest.approx(data["baseline"]["weight_bytes"] / data["model"]["weight_bytes"])
    out = capsys.readouterr().out
    assert "fraction of bound" in out and "predicted speedup" not in out
    # no H200 prediction beside a CPU measurement: the column shows "-" and a note says why
    rows = [line for line in out.splitlines() if line.startswith("random:tiny-llama")]
    assert len(rows) == 2 and all(line.split()[3 if "(" not in line else 7] == "-" for line in rows), rows
    assert "pred ms: not shown on cpu: the cost model predicts an NVIDIA H200" in out
    assert data["model"]["predicted_for"] == cost.H200_BF16.name
    assert data["settings"]["dense_gemv"] is True  # the default: rankcut's dense GEMV where it applies (CUDA)


def test_cli_bench_dense_gemv_flag(tmp_path, capsys, monkeypatch):
    seen = {}
    real = run.make_decoder

    def spy(*args, **kwargs):
        seen.setdefault("dense_gemv", []).append(kwargs.get("dense_gemv"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "make_decoder", spy)
    out = tmp_path / "bench.json"
    assert main(["bench", "random:tiny-llama", "--compare", "random:tiny-llama", "--random-lowrank", "0.5", "--device",
                 "cpu", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--quiet", "--dense-gemv",
                 "cublas", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["dense_gemv"] is False
    assert seen["dense_gemv"] == [False, False]  # both models, the baseline too
    with pytest.raises(SystemExit):
        main(["bench", "random:tiny-llama", "--device", "cpu", "--dense-gemv", "magma"])
    assert "invalid choice: 'magma'" in capsys.readouterr().err


def test_cli_bench_batch_list_measures_each_batch_with_both_bounds(tmp_path, capsys):
    out = tmp_path / "batches.json"
    code = main(["bench", "random:tiny-llama", "--compare", "random:tiny-llama", "--random-lowrank", "0.5", "--device",
                 "cpu", "--batch", "1,3", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--quiet",
                 "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [e["model"]["batch"] for e in data["batches"]] == [1, 3] and data["settings"]["batch"] == [1, 3]
    for entry in data["batches"]:
        base, mod, c = entry["baseline"], entry["model"], entry["comparison"]
        assert c["flop_bound"] == pytest.approx(base["matmul_params"] / mod["matmul_params"])
        assert mod["flop_bound_tokens_per_s"] == pytest.approx(cost.H200_BF16.flops / (2 * mod["matmul_params"]))
        assert mod["kv_cache_bytes"] == entry["model"]["batch"] * data["batches"][0]["model"]["kv_cache_bytes"]
    model = random_model(preset_config("tiny-llama"), torch.float32, "cpu")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    from rankcut.bench.run import matmul_params

    assert matmul_params(model) == sum(p.numel() for p in model.parameters()) - vocab * hidden  # the table is indexed
    printed = capsys.readouterr().out
    assert "FLOP bound" in printed and printed.count("random:tiny-llama (random low-rank") == 2


@pytest.mark.parametrize("argv, message", [
    (["random:tiny-llama", "--batch", "1,0"], "--batch must be >= 1"),
    (["random:tiny-llama", "--batch", "1,x"], "expected a comma-separated list"),
    (["random:llama9"], "unknown shape"),
    (["/no/such/model"], "does not exist"),
    (["random:tiny-llama", "--batch", "0"], "--batch must be >= 1"),
    (["random:tiny-llama", "--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["random:tiny-llama", "--random-lowrank", "1.5"], "--random-lowrank must be in"),
    (["random:tiny-llama", "--compare", "/no/such/dense"], "does not exist"),
])
def test_cli_bench_bad_input(tmp_path, capsys, argv, message):
    out = tmp_path / "x.json"
    assert main(["bench", *argv, "--device", "cpu", "--json", str(out)]) == 2
    assert "rankcut: error: " in capsys.readouterr().err and not out.exists()
    main(["bench", *argv, "--device", "cpu"])
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_graph_decode_equals_eager_on_gpu(build, lowrank):
    model = build().to("cuda", torch.bfloat16)
    if lowrank:
        random_lowrank_(model, 0.5)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)).cuda()
    dec = make_decoder(model, batch=2, max_len=16)
    with torch.no_grad():
        ids = prompt[:, :1]
        hf = model(prompt).logits[:, -1].float()
        ours = dec.forward(prompt, torch.zeros(1, dtype=torch.long, device="cuda")).float()
        assert float((ours - hf).norm() / hf.norm()) < 2e-2  # Triton glue vs HF modules, bf16
        eager = DecodeLoop(dec, prompt, 8, use_graph=False)
        eager.prefill()
        eager.run_steps()
        graphed = DecodeLoop(dec, prompt, 8, use_graph=True)
        graphed.prefill()
        graphed.run_steps()
    assert graphed.tokens.tolist() == eager.tokens.tolist()
    del ids


@pytest.mark.gpu
def test_bench_api_on_gpu():
    result = rankcut.bench.bench("random:tiny-llama", compare="random:tiny-llama", random_lowrank=0.5, prompt_len=8,
                                 new_tokens=16, repeats=2, bandwidth=1e12)
    for role in ("baseline", "model"):
        r = result[role]
        assert r["cuda_graph"] and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["kernels_per_step"] is None or r["kernels_per_step"] > r["target_launches_per_step"]
    assert result["comparison"]["bound"] > 1


def test_bench_api_refuses_an_unknown_attention_before_loading(monkeypatch):
    import rankcut.bench.run as run

    monkeypatch.setattr(run, "load_for_bench", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="attention must be one of auto, sdpa, got 'flash'"):
        run.bench("random:tiny-llama", attention="flash", device="cpu")
