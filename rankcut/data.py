"""Text sources and token windows, shared by calibration and evaluation.

A text source is a path to a plain-text file (read as is), a list of strings, a token tensor, or a known
dataset name (``wikitext2``, ``ptb``, ``c4``) fetched through the ``datasets`` library when it is
installed and the Hub is reachable. Dataset rows are joined with ``"\\n\\n"`` (the literature's protocol);
files are never re-joined.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# name -> (load_dataset arguments per split alias, text field). C4 is read from one shard of each split
# (the literature's practice) rather than the whole multi-terabyte corpus.
_C4 = "en/c4-{}.00000-of-{:05d}.json.gz"
DATASETS = {
    "wikitext2": (
        {s: dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", split=s) for s in ("train", "validation", "test")},
        "text",
    ),
    "ptb": (
        {s: dict(path="ptb-text-only/ptb_text_only", name="penn_treebank", split=s) for s in ("train", "validation", "test")},
        "sentence",
    ),
    "c4": (
        {
            "train": dict(path="allenai/c4", data_files={"train": _C4.format("train", 1024)}, split="train"),
            "validation": dict(path="allenai/c4", data_files={"validation": _C4.format("validation", 8)}, split="validation"),
            "test": dict(path="allenai/c4", data_files={"validation": _C4.format("validation", 8)}, split="validation"),
        },
        "text",
    ),
}


def source_name(source) -> str:
    """A short name for a text source: a file's stem or the dataset name (used as a key in results)."""
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return Path(text).stem if os.path.exists(text) else text
    return "text"


def _dataset_text(name: str, split: str) -> str:
    splits, column = DATASETS[name]
    args = splits[split]
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is a Hub dataset: install the 'datasets' package (pip install rankcut[data]) or pass a local file"
        ) from None
    try:
        rows = datasets.load_dataset(**args)
    except Exception as err:  # network errors come in many types
        raise ValueError(f"could not load dataset {name!r} ({args['path']}, split {split}): {err}") from err
    if name == "c4" and len(rows) > 20000:
        rows = rows.select(range(20000))
    return "\n\n".join(rows[column])


def check_source(source, what: str = "text source") -> None:
    """Raise ValueError unless ``source`` (a path or name) is an existing file or a known dataset name.

    ``what`` names the source in the message (``--calib`` in the CLI, ``calibration text`` in the API).
    """
    if source is None or not isinstance(source, (str, os.PathLike)):
        return
    if not os.path.exists(os.path.expanduser(str(source))) and str(source) not in DATASETS:
        raise ValueError(f"{what} {source}: no such file, and not a known dataset ({', '.join(DATASETS)})")


def read_file_text(path: str | os.PathLike) -> str:
    """A text file's contents exactly as stored (``\r\n`` kept), decoded as UTF-8.

    Raises:
        ValueError: the file is not text (NUL bytes, as in a ``.safetensors`` or other binary file) or not UTF-8.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    if b"\x00" in raw:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes: a binary file, e.g. model weights?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {err.start}); give a plain-text file") from None


def read_text(source: str | os.PathLike, split: str = "test") -> str:
    """The text of a file path or a known dataset name (``split`` applies to datasets only).

    Raises:
        ValueError: the source is neither an existing file nor a known dataset, or it is empty.
    """
    text_source = str(source)
    if os.path.isfile(text_source):
        text = read_file_text(text_source)
    elif text_source in DATASETS:
        text = _dataset_text(text_source, split)
    else:
        raise ValueError(
            f"text source {text_source!r} is not an existing file nor a known dataset ({', '.join(DATASETS)})"
        )
    if not text.strip():
        raise ValueError(f"text source {text_source!r} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D tensor (no special tokens added, no length limit)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(source, tokenizer, split: str = "test") -> torch.Tensor:
    """A 1-D token stream from any text source (path, dataset name, list of strings, token tensor)."""
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token tensor must hold integers, got {source.dtype}")
        return source.reshape(-1).long()
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn text into tokens (pass tokenizer= or token ids)")
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(s, str) for s in source):
            raise ValueError("a list text source must be a non-empty list of strings")
        return tokenize(tokenizer, "\n\n".join(source))
    if isinstance(source, (str, os.PathLike)):
        return tokenize(tokenizer, read_text(source, split))
    raise ValueError(f"unsupported text source of type {type(source).__name__}")


def sample_windows(
    ids: torch.Tensor, seq_len: int, n: int, seed: int = 0, sampling: str = "random", what: str = "calibration"
) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seq_len`` tokens from a stream, as an (n, seq_len) tensor.

    ``random`` picks distinct aligned windows with a seeded generator; ``first`` takes the first ``n``.

    Raises:
        ValueError: the stream holds fewer than ``n`` windows (the message says how many it holds).
    """
    available = ids.numel() // seq_len
    if available < n:
        raise ValueError(
            f"{what} text too short: {ids.numel()} tokens make {available} window(s) of {seq_len} tokens, "
            f"but {n} were requested; give more text, fewer samples or a shorter seq_len"
        )
    chunks = ids[: available * seq_len].view(available, seq_len)
    if sampling == "first":
        return chunks[:n].clone()
    if sampling != "random":
        raise ValueError(f"unknown sampling {sampling!r}; choose random or first")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    return chunks[order.sort().values].clone()


def calibration_windows(calib, tokenizer, n: int, seq_len: int, seed: int = 0, sampling: str = "random") -> torch.Tensor:
    """Calibration windows from any text source; a 2-D token tensor is taken as ready-made windows."""
    if isinstance(calib, torch.Tensor) and calib.ndim == 2:
        if calib.shape[0] < n:
            raise ValueError(f"calibration tensor has {calib.shape[0]} windows, {n} requested")
        if calib.shape[1] != seq_len:
            log.info("calibration windows are %d tokens long (seq_len %d ignored)", calib.shape[1], seq_len)
        rows = torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return calib[rows.sort().values].long() if sampling == "random" else calib[:n].long()
    return sample_windows(token_stream(calib, tokenizer, split="train"), seq_len, n, seed, sampling)
