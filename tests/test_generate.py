"""``rankcut.generate`` and ``rankcut generate``: the fast loop (forced, eager on the CPU) gives Hugging Face's
greedy tokens for a batch of prompts of different lengths; the fallback is Hugging Face; seeded sampling, stop
strings, end of sequence, streaming, bad input, the CLI; and the CUDA-graph path on a GPU (``gpu`` marker)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

import rankcut
from rankcut.bench.models import random_lowrank_
from rankcut.bench.decode import make_decoder
from rankcut.bench.generate import format_summary
from rankcut.bench.sampling import Sampler, uniforms
from rankcut.cli import main
from conftest import shared_path
from tiny_models import gpt2, llama, opt, save_tiny, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["def fib(n):\n", "import os\nimport sys\n\n\ndef main(argv):\n    ", "class A"]
REAL = {"codellama-16m": ("testbed", "codellama-16m"), "codegpt2-23m": ("testbed", "codegpt2-23m"),
        "stories260K": ("stories260K", "hf")}
NEW = 10


@pytest.fixture(scope="module", params=list(REAL))
def real(request):
    path = shared_path(*REAL[request.param])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return llama(), tiny_tokenizer()


def hf_alone(model, tok, prompts, new, eos=None) -> list[list[int]]:
    """Hugging Face greedy tokens of each prompt generated alone (no padding), up to its first EOS (kept)."""
    eos = model.generation_config.eos_token_id if eos is None else eos
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 pad_token_id=0, eos_token_id=list(eos) or None)[0, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
        out.append(gen[:cut])
    return out


# ------------------------------------------------------------------------------------------ greedy


def test_fast_loop_greedy_equals_hf_generate(real):
    model, tok = real
    fast = rankcut.generate(model, tok, PROMPTS, max_new_tokens=NEW, engine="fast")
    assert fast.engine == "fast" and not fast.cuda_graph
    assert fast.token_ids == hf_alone(model, tok, PROMPTS, NEW)
    # Hugging Face on the same left-padded batch (the fallback engine), token for token
    hf = rankcut.generate(model, tok, PROMPTS, max_new_tokens=NEW, engine="hf")
    assert hf.engine == "hf" and hf.token_ids == fast.token_ids and hf.texts == fast.texts
    first = [t for t in fast.token_ids[0] if t != tok.eos_token_id]
    assert fast.texts[0] == tok.decode(first, skip_special_tokens=True)
    assert fast.new_tokens == sum(map(len, fast.token_ids)) and fast.tokens_per_s > 0


def test_cpu_auto_falls_back_to_hf_with_a_notice(tiny, caplog):
    model, tok = tiny
    with caplog.at_level(logging.WARNING, logger="rankcut.bench.generate"):
        out = rankcut.generate(model, tok, PROMPTS, max_new_tokens=6)
    assert out.engine == "hf" and "the fast loop needs CUDA" in caplog.text
    assert out.token_ids == hf_alone(model, tok, PROMPTS, 6)


def test_unsupported_architecture_falls_back_or_refuses(caplog):
    model, tok = opt(), tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="rankcut.bench.generate"):
        out = rankcut.generate(model, tok, "the quick", max_new_tokens=3)
    assert out.engine == "hf" and "supports the Llama family" in caplog.text and len(out.texts) == 1
    with pytest.raises(ValueError, match="supports the Llama family"):
        rankcut.generate(model, tok, "the quick", max_new_tokens=3, engine="fast")


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("form", ["lowrank", "fused"])
def test_fast_loop_on_compressed_and_fused_models(build, form):
    """Low-rank layers (fused into LowRankGroups by the decoder), or a model fused for inference already: the same
    tokens as Hugging Face, and afterwards the layers own their storage again."""
    model, tok = build(), tiny_tokenizer()
    random_lowrank_(model, 0.5)
    if form == "fused":
        rankcut.prepare_for_inference(model)
    fast = rankcut.generate(model, tok, PROMPTS, max_new_tokens=6, engine="fast")
    assert fast.token_ids == hf_alone(model, tok, PROMPTS, 6)
    if build is llama and form == "lowrank":
        attn = model.model.layers[0].self_attn
        ptrs = {m.V.weight.untyped_storage().data_ptr() for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
        assert len(ptrs) == 3  # unfused: save_pretrained would refuse shared tensors


# ---------------------------------------------------------------------------------------- sampling


def test_sampler_draws_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for top_p, want in ((1.0, [0.5, 0.3, 0.15, 0.05]), (0.7, [0.625, 0.375, 0.0, 0.0])):
        sampler = Sampler(1.0, top_p, seed=3, batch=1, device=torch.device("cpu"))
        draws = torch.cat([sampler(logits, torch.tensor([i])) for i in range(4000)])
        freq = torch.bincount(draws, minlength=4) / 4000
        assert torch.allclose(freq, torch.tensor(want), atol=0.03), (top_p, freq)
    u = uniforms(torch.tensor([1, 2]), torch.tensor([5]), torch.arange(10000))
    assert 0 < u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])  # rows draw from their own streams
    greedy = Sampler(0.0, 1.0, seed=0, batch=1, device=torch.device("cpu"))
    assert greedy(logits, torch.tensor([0])).tolist() == [0]


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_sampling_with_a_seed_is_reproducible(tiny, engine):
    model, tok = tiny
    run = lambda seed: rankcut.generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9,  # noqa: E731
                                        seed=seed, engine=engine).token_ids
    first = run(1)
    assert run(1) == first and run(2) != first
    greedy = rankcut.generate(model, tok, PROMPTS, max_new_tokens=8, engine=engine, seed=5).token_ids
    assert greedy == rankcut.generate(model, tok, PROMPTS, max_new_tokens=8, engine=engine).token_ids  # seed unused


# ------------------------------------------------------------------------------ stop strings, EOS


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_stop_strings_cut_the_text(tiny, engine):
    model, tok = tiny
    full = rankcut.generate(model, tok, PROMPTS, max_new_tokens=12, engine=engine)
    stop = full.texts[0][6:9]
    assert stop and len(full.texts[0]) > 9
    pieces: dict[int, list[str]] = {}
    cut = rankcut.generate(model, tok, PROMPTS, max_new_tokens=12, engine=engine, stop=[stop, "no such text"],
                           stream=lambda row, text: pieces.setdefault(row, []).append(text))
    for b, text in enumerate(full.texts):
        at = text.find(stop)
        if at < 0:
            assert cut.texts[b] == text and cut.finish_reasons[b] == full.finish_reasons[b]
            continue
        assert cut.texts[b] == text[:at] and cut.finish_reasons[b] == "stop"
        ids = cut.token_ids[b]  # ends with the token that completed the stop string
        assert ids == full.token_ids[b][:len(ids)] and stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    assert cut.finish_reasons[0] == "stop" and cut.new_tokens < full.new_tokens
    assert {b: "".join(p) for b, p in pieces.items()} == {b: t for b, t in enumerate(cut.texts) if t}


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_eos_stops_a_row(tiny, engine):
    model, tok = tiny
    full = rankcut.generate(model, tok, PROMPTS, max_new_tokens=10, engine=engine)
    eos = full.token_ids[0][3]
    out = rankcut.generate(model, tok, PROMPTS, max_new_tokens=10, engine=engine, eos_token_id=eos)
    for b, ids in enumerate(full.token_ids):
        if eos in ids:
            n = ids.index(eos) + 1
            assert out.token_ids[b] == ids[:n] and out.finish_reasons[b] == "eos"
            assert out.texts[b] == tok.decode(ids[:n - 1], skip_special_tokens=True)
        else:
            assert out.token_ids[b] == ids and out.finish_reasons[b] == "length"
    assert out.finish_reasons[0] == "eos" and len(out.token_ids[0]) <= 4


def test_streaming_one_prompt_gives_its_text(tiny):
    model, tok = tiny
    pieces = []
    out = rankcut.generate(model, tok, "the quick brown", max_new_tokens=8, engine="fast",
                           stream=lambda row, text: pieces.append((row, text)))
    assert len(pieces) > 1 and {r for r, _ in pieces} == {0} and "".join(t for _, t in pieces) == out.texts[0]
    assert out.prefill_seconds > 0 and out.decode_tokens_per_s > 0 and "then decoding" in format_summary(out)


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "no prompt given"),
    (dict(prompts=["the", ""]), "prompt 2 is empty"),
    (dict(prompts=""), "prompt 1 is empty"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=0.9), "applies to sampling only"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(seed=-1, temperature=1.0), "seed must be an integer >= 0"),
    (dict(stop=[""]), "stop strings must be non-empty"),
    (dict(engine="vllm"), "engine must be one of auto, fast, hf"),
    (dict(prompts=["the " * 70]), "the model takes at most 64 positions"),
    (dict(prompts=["the " * 30], max_new_tokens=40), "lower max_new_tokens to"),
    (dict(tokenizer=None), "needs the model's tokenizer"),
    (dict(engine="fast", use_graph=True), "use_graph needs a CUDA device"),
])
def test_bad_input(tiny, kwargs, message):
    model, tok = tiny
    args = {"tokenizer": tok, "prompts": ["the quick"], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        rankcut.generate(model, args.pop("tokenizer"), args.pop("prompts"), **args)


# -------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("generate") / "tiny", "llama")


def test_cli_streams_one_prompt_and_prints_speed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "gen.json"
    code = main(["generate", str(tiny_dir), "--prompt", "the quick brown", "--max-new-tokens", "6", "--device", "cpu",
                 "--engine", "fast", "--json", str(out), "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    data = json.loads(out.read_text())
    assert captured.out == "the quick brown" + data["texts"][0] + "\n"
    assert "tokens/s (rankcut fast loop, eager; batch 1" in captured.err
    assert data["engine"] == "fast" and data["new_tokens"] == len(data["token_ids"][0]) == 6


def test_cli_several_prompts_fall_back_on_the_cpu(tiny_dir, tmp_path, capsys, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n\nclass Point:\n")
    with caplog.at_level(logging.WARNING, logger="rankcut.bench.generate"):
        code = main(["generate", str(tiny_dir), "--prompt", "the quick", "--prompt-file", str(prompts),
                     "--max-new-tokens", "4", "--device", "cpu", "--temperature", "0.8", "--seed", "1", "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if line.startswith("--- prompt")] == [
        "--- prompt 1/3 ---", "--- prompt 2/3 ---", "--- prompt 3/3 ---"]
    assert "\nthe quick" in captured.out and "\nclass Point:" in captured.out
    assert "tokens/s (Hugging Face generate; batch 3" in captured.err
    assert "using Hugging Face generate" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: max_new_tokens must be"),
    (["--top-p", "0.5"], "applies to sampling only"),
    (["--temperature", "-1"], "--temperature: temperature must be >= 0"),
    (["--prompt", ""], "prompt 2 is empty"),
    (["--max-new-tokens", "100"], "passes the model's 64 positions; lower max_new_tokens to"),
])
def test_cli_bad_input(tiny_dir, capsys, argv, message):
    base = ["generate", str(tiny_dir), "--prompt", "the", "--device", "cpu", "--quiet"]
    assert main(base + argv) == 2
    captured = capsys.readouterr()
    assert "rankcut: error: " in captured.err and message in captured.err, captured.err
    assert captured.out == ""  # nothing printed before the error
    assert main(["generate", str(tiny_dir), "--device", "cpu"]) == 2
    assert "no prompt: give --prompt TEXT or --prompt-file FILE" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["codellama-16m", "codegpt2-23m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_graph_fast_path_is_greedy_generation(name, dtype):
    """The CUDA-graph fast path on a GPU: Hugging Face's greedy tokens in float32; in bfloat16 (rankcut's Triton
    glue and fused products against Hugging Face's modules, rounding differently) every chosen token is
    Hugging Face's argmax up to a small logit margin, given the same prefix."""
    path = shared_path(*REAL[name])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()
    new = 24
    fast = rankcut.generate(model, tok, PROMPTS, max_new_tokens=new)
    assert fast.engine == "fast" and fast.cuda_graph
    eager = rankcut.generate(model, tok, PROMPTS, max_new_tokens=new, use_graph=False)
    assert eager.token_ids == fast.token_ids  # the graph replays the eager step
    if dtype == torch.float32:
        assert fast.token_ids == hf_alone(model, tok, PROMPTS, new)
    for prompt, ids in zip(PROMPTS, fast.token_ids):
        prefix = tok(prompt, return_tensors="pt").input_ids.cuda()
        seq = torch.cat([prefix, torch.tensor([ids], device="cuda")], dim=1)
        with torch.no_grad():
            logits = model(seq).logits[0, prefix.shape[1] - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(ids, device="cuda")[:, None])[:, 0]
        margin = logits.max(dim=1).values - chosen
        assert float(margin.max()) <= (1e-4 if dtype == torch.float32 else 0.75), (name, margin)
    sampled = [rankcut.generate(model, tok, PROMPTS, max_new_tokens=new, temperature=0.8, top_p=0.95, seed=7).token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.gpu
def test_cuda_loop_streams_and_stops_while_the_next_step_runs():
    """On CUDA the host reads tokens one step behind the device: streamed text, stop strings and the
    decode-only speed come out as they do when it waits for every step."""
    path = shared_path(*REAL["codellama-16m"])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    full = rankcut.generate(model, tok, PROMPTS[0], max_new_tokens=32)
    assert full.decode_tokens_per_s > 0 and full.prefill_seconds > 0
    pieces = []
    streamed = rankcut.generate(model, tok, PROMPTS[0], max_new_tokens=32, stream=lambda r, t: pieces.append(t))
    assert streamed.token_ids == full.token_ids and "".join(pieces) == full.texts[0]
    text = full.texts[0]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = rankcut.generate(model, tok, PROMPTS[0], max_new_tokens=32, stop=stop)
    assert cut.finish_reasons == ["stop"] and cut.texts[0] == text[:text.index(stop)]
    assert full.token_ids[0][:len(cut.token_ids[0])] == cut.token_ids[0]


def test_sliding_window_models_use_the_fast_loop_only_inside_the_window(caplog):
    """The fast loop attends to the whole cache: a sliding-window model (Mistral) beyond its window falls back
    to Hugging Face (auto) or is refused (fast); inside the window it runs and equals Hugging Face."""
    from tiny_models import mistral

    tok = tiny_tokenizer()
    prompt = "the quick brown"
    n = len(tok(prompt).input_ids)
    window = n + 6
    model = mistral(sliding_window=window)
    with pytest.raises(ValueError, match=f"sliding window of {window} positions"):
        rankcut.generate(model, tok, prompt, max_new_tokens=7, engine="fast")
    with pytest.raises(ValueError, match=f"sliding window of {window} positions"):
        make_decoder(model, 1, window + 1)
    inside = rankcut.generate(model, tok, prompt, max_new_tokens=6, engine="fast")
    assert inside.token_ids == rankcut.generate(model, tok, prompt, max_new_tokens=6, engine="hf").token_ids
    caplog.set_level(logging.WARNING)
    from rankcut.bench.generate import choose_engine

    assert choose_engine(model, "auto", window + 1) == "hf" and "sliding window" in caplog.text
