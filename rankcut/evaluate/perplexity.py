"""Perplexity with the literature's protocol (DESIGN.md §4).

The text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens (the remainder is
dropped); perplexity is ``exp`` of the mean next-token negative log-likelihood over every predicted token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rankcut.calibrate import batches
from rankcut.utils import default_seq_len
from rankcut.data import source_name, token_stream


def perplexity(
    model: nn.Module,
    tokenizer,
    text,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    label: str | None = None,
) -> float:
    """Perplexity of a causal LM on ``text`` (file path, dataset name, list of strings or token tensor).

    Args:
        seq_len: window length; default min(2048, model maximum).
        max_windows: evaluate only the first N windows (None: all).
        label: what the progress bar calls the evaluation (``ppl <label>``; default the text's name).

    Raises:
        ValueError: the text is shorter than one window, or the model has no LM head.
    """
    seq_len = seq_len or default_seq_len(model)
    ids = token_stream(text, tokenizer, split="test")
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        count = min(count, max_windows)
    windows = ids[: count * seq_len].view(count, seq_len)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            desc = f"ppl {label or source_name(text)}"
            for batch in tqdm(list(batches(windows, batch_size)), desc=desc, disable=not progress):
                batch = batch.to(device)
                logits = getattr(model(input_ids=batch, use_cache=False), "logits", None)
                if logits is None:
                    raise ValueError(f"{type(model).__name__} has no LM head: perplexity needs a causal LM")
                if logits.shape[-1] < 2:
                    raise ValueError("model output has no vocabulary dimension (is it a causal LM?)")
                nll = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total += nll.item()
                tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / tokens)


def evaluate(
    model: nn.Module,
    tokenizer,
    ppl: list = (),
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
    label: str | None = None,
) -> dict:
    """Perplexity on each text source; returns ``{"perplexity": {name: value}, "settings": {...}}``.

    ``label`` tells the progress bars of several models apart: ``ppl <text> (<label>)``.
    """
    seq_len = seq_len or default_seq_len(model)
    results = {}
    for source in ppl:
        name = source_name(source)
        results[name] = perplexity(model, tokenizer, source, seq_len, max_windows, batch_size, device, progress,
                                   label=f"{name} ({label})" if label else None)
    return {"perplexity": results, "settings": {"seq_len": seq_len, "max_windows": max_windows, "batch_size": batch_size}}
