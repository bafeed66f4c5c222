"""Embedding fidelity of a compressed encoder against its dense model (DESIGN.md §4).

A sentence embedding is the last hidden state mean-pooled over the real tokens (the attention mask) and
L2-normalised, as sentence-transformers computes it. Fidelity compares the compressed and dense embeddings
of the same held-out sentences:

- ``mean_cosine`` / ``min_cosine``: mean and minimum of the per-sentence cosine similarity;
- ``nn_agreement``: fraction of sentences whose nearest neighbour among the *other* sentences (by cosine)
  is the same under both models (retrieval agreement).

Sentences come from a text file with :func:`read_sentences`: one sentence per non-empty line (stripped),
skipping WikiText heading lines (lines starting with ``" ="``, e.g. ``" = Valkyria Chronicles = "``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_SENTENCES = 500


def read_sentences(path, max_sentences: int | None = DEFAULT_MAX_SENTENCES) -> list[str]:
    """The first ``max_sentences`` non-empty, stripped lines of ``path`` that are not WikiText headings
    (a raw line starting with ``" ="``). ``None``: all of them.

    Raises:
        ValueError: fewer than two sentences (nearest neighbours need at least two), or ``max_sentences < 2``.
    """
    if max_sentences is not None and max_sentences < 2:
        raise ValueError(f"max_sentences must be >= 2, got {max_sentences}")
    sentences = []
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            if raw.startswith(" ="):
                continue
            line = raw.strip()
            if line:
                sentences.append(line)
                if max_sentences is not None and len(sentences) >= max_sentences:
                    break
    if len(sentences) < 2:
        raise ValueError(f"{path} holds {len(sentences)} usable sentence(s); fidelity needs at least 2")
    return sentences


def _max_length(model: nn.Module, tokenizer, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    limits = [512, getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max > 0:
        limits.append(tok_max)
    return min(limits)


def sentence_embeddings(
    model: nn.Module,
    tokenizer,
    sentences: list[str],
    batch_size: int = 32,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """``(len(sentences), hidden)`` float32 embeddings: last hidden state mean-pooled over the attention
    mask, L2-normalised. Sentences are right-padded per batch and truncated to ``max_length`` tokens
    (default: min(512, model and tokenizer maximum)). A tokenizer without a pad token pads with its EOS
    or UNK token (the attention mask hides it either way)."""
    if not sentences:
        raise ValueError("no sentences to embed")
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    max_length = _max_length(model, tokenizer, max_length)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(sentences), batch_size):
                batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                                  max_length=max_length, return_tensors="pt")
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                output = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                hidden = getattr(output, "last_hidden_state", None)
                if hidden is None:
                    hidden = output.hidden_states[-1]
                hidden = hidden.float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                out.append(F.normalize(pooled, dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar *other* row (cosine, for unit-norm rows)."""
    sim = embeddings @ embeddings.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def compare_embeddings(embeddings: torch.Tensor, dense: torch.Tensor) -> dict:
    """Fidelity of unit-norm ``embeddings`` against ``dense`` ones of the same sentences."""
    if embeddings.shape != dense.shape:
        raise ValueError(f"embedding shapes differ: {tuple(embeddings.shape)} vs {tuple(dense.shape)}")
    if embeddings.shape[0] < 2:
        raise ValueError("fidelity needs at least 2 sentences")
    cosine = (embeddings * dense).sum(1)
    return {
        "mean_cosine": cosine.mean().item(),
        "min_cosine": cosine.min().item(),
        "nn_agreement": (nearest_neighbours(embeddings) == nearest_neighbours(dense)).float().mean().item(),
        "n": embeddings.shape[0],
    }


def embedding_fidelity(
    model: nn.Module,
    dense_model: nn.Module,
    tokenizer,
    sentences: list[str],
    batch_size: int = 32,
    device: str | torch.device | None = None,
    max_length: int | None = None,
) -> dict:
    """``{"mean_cosine", "min_cosine", "nn_agreement", "n"}`` of ``model`` against ``dense_model`` on
    ``sentences`` (see the module docstring). Both models share ``tokenizer``."""
    dense = sentence_embeddings(dense_model, tokenizer, sentences, batch_size, device, max_length)
    emb = sentence_embeddings(model, tokenizer, sentences, batch_size, device, max_length)
    return compare_embeddings(emb, dense)
