"""Tiny random Hugging Face models of every architecture rankcut supports, and a tiny offline tokenizer.

Everything here is built in the test process from a config (no Hub access): hidden sizes of 32-64, two
blocks, a vocabulary of a few hundred tokens, so a forward pass takes milliseconds on a CPU. Every factory
seeds torch first, so the same call gives the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

VOCAB = 300
SEQ = 16  # calibration / test window length
MAX_POS = 64


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def gpt2(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=MAX_POS, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2, n_head=2,
        n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, **{"tie_word_embeddings": False, **kw},
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def mistral(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, **{"sliding_window": None, **kw},
    )
    return transformers.MistralForCausalLM(cfg).eval()


def qwen2(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, **{"tie_word_embeddings": False, **kw},
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


def opt(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    cfg = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_POS, dropout=0.0, attention_dropout=0.0, **kw,
    )
    return transformers.OPTForCausalLM(cfg).eval()


def gpt_neox(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_POS, rotary_pct=0.5, **{"tie_word_embeddings": False, **kw},
    )
    return transformers.GPTNeoXForCausalLM(cfg).eval()


def _bert_config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_POS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )


def bert(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    return transformers.BertModel(_bert_config(**kw)).eval()


def bert_mlm(seed: int = 0, **kw) -> transformers.PreTrainedModel:
    _seeded(seed)
    return transformers.BertForMaskedLM(_bert_config(**kw)).eval()


@dataclass(frozen=True)
class Arch:
    """One architecture under test: how to build it and what its names look like."""

    name: str
    build: Callable[..., transformers.PreTrainedModel]
    causal: bool
    targets: tuple[str, ...]  # a few names that must be targets
    not_targets: tuple[str, ...]  # module names that must never be default targets
    attn_inputs: tuple[str, ...] = ()  # targets (block 0) that read one shared input, if any
    n_targets: int = 0  # number of default targets


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("gpt2", gpt2, True,
             ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc",
              "transformer.h.1.mlp.c_proj"),
             ("lm_head", "transformer.wte", "transformer.wpe"), (), 8),
        Arch("llama", llama, True,
             ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"),
             ("lm_head", "model.embed_tokens"),
             ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
             14),
        Arch("mistral", mistral, True,
             ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"), ("lm_head", "model.embed_tokens"),
             ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
             14),
        Arch("qwen2", qwen2, True,
             ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"), ("lm_head", "model.embed_tokens"),
             ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
             14),
        Arch("opt", opt, True,
             ("model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.out_proj",
              "model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"),
             ("lm_head", "model.decoder.embed_tokens", "model.decoder.embed_positions"),
             ("model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.k_proj",
              "model.decoder.layers.0.self_attn.v_proj"),
             12),
        Arch("gpt_neox", gpt_neox, True,
             ("gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.attention.dense",
              "gpt_neox.layers.1.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
             ("embed_out", "gpt_neox.embed_in"), (), 8),
        Arch("bert", bert, False,
             ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense",
              "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"),
             ("pooler.dense", "embeddings.word_embeddings"),
             ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
              "encoder.layer.0.attention.self.value"),
             12),
    )
}


def token_windows(n: int = 8, seq: int = SEQ, seed: int = 1234, vocab: int = VOCAB) -> torch.Tensor:
    """An (n, seq) tensor of random token ids: calibration data that needs no tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=gen)


# ------------------------------------------------------------------------------------------- tokenizer

CORPUS = (
    "the quick brown fox jumps over the lazy dog. a small model reads a small text and predicts the next word. "
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "low rank factors keep most of the energy of a weight matrix while storing fewer numbers. "
)


def sample_text(words: int = 400, seed: int = 0) -> str:
    """Pseudo-random text over the corpus vocabulary (deterministic for a seed)."""
    vocab = CORPUS.replace("\n", " \n ").split(" ")
    vocab = [w for w in vocab if w]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(vocab), (words,), generator=gen).tolist()
    return " ".join(vocab[i] for i in picks)


def tiny_tokenizer(vocab_size: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a few lines, wrapped for ``transformers``.

    Byte-level BPE never produces unknown tokens, so any text can be tokenized; ids stay below
    ``vocab_size`` so they fit the tiny models' embeddings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS, sample_text(200, 1)], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_max_length=MAX_POS,
    )
    assert len(fast) <= vocab_size, len(fast)
    return fast


def save_tiny(path: str | Path, arch: str = "llama", dtype: torch.dtype | None = None, **kw) -> Path:
    """Save a tiny ``arch`` model and the tiny tokenizer to ``path`` with ``save_pretrained`` (for the CLI)."""
    path = Path(path)
    model = ARCHS[arch].build(**kw)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, or the last hidden state of an encoder / bare decoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
