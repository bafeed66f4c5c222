"""Text generation: :func:`generate` and ``rankcut generate``, on rankcut's fast loop or Hugging Face's.

The *fast loop* (:class:`rankcut.bench.loop.GenerationLoop`) is the decode benchmark's: a static KV cache,
q/k/v and gate/up fused, one decode step captured in a CUDA graph and replayed, the next token chosen on the
device.
It runs for the architectures the decode step supports (the Llama family, GPT-2) on CUDA. Elsewhere
(``engine="auto"``: another architecture, or the CPU) generation falls back to Hugging Face ``generate``
with a one-line warning; ``engine="fast"`` forces the fast loop (eager on the CPU, for testing its
correctness), ``engine="hf"`` forces Hugging Face.

Both engines give the same tokens for greedy decoding (up to floating-point ties): prompts of different
lengths are left-padded, with an attention mask (Hugging Face) or per-row positions and a key mask (the fast
loop), which computes exactly what each prompt alone would. Sampling draws from ``softmax(logits / T)``
restricted to the top-p nucleus, reproducibly for a seed; the two engines draw differently (the fast loop
from a counter-based hash, :mod:`rankcut.bench.sampling`; Hugging Face from torch's generator), so the
same seed gives the same text on the same engine only.

A row stops at an end-of-sequence token (kept in its ``token_ids``, not in its text) or once its text
contains a stop string (the text is cut before the stop string; ``token_ids`` end with the token that
completed it). Stop strings are searched in the generated text only, not in the prompt.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import transformers

log = logging.getLogger(__name__)

ENGINES = ("auto", "fast", "hf")
#: Fast loop without streaming: the host checks for finished rows every this many tokens.
CHECK_EVERY = 16


@dataclass
class GenerationResult:
    """What :func:`generate` returns: one entry per prompt, and the speed.

    Attributes:
        texts: the generated text of each prompt (without the prompt), cut before the first stop string.
        token_ids: the generated token ids of each prompt, up to its end-of-sequence token (included), the
            token that completed a stop string, or ``max_new_tokens``.
        finish_reasons: ``"eos"``, ``"stop"`` or ``"length"`` for each prompt.
        new_tokens: generated tokens, all prompts together (the lengths of ``token_ids``).
        seconds: wall time of the generation (prefill and decoding; no tokenization, no CUDA-graph capture).
        tokens_per_s: ``new_tokens / seconds``.
        prefill_seconds: fast loop: time to the first token of every row (the prompt's forward pass).
        decode_tokens_per_s: fast loop: the tokens after each row's first, per second of decoding (device time
            from the first token to the last, host waits included): the figure ``rankcut bench`` measures.
        engine: ``"fast"`` (rankcut's loop) or ``"hf"`` (Hugging Face ``generate``).
        cuda_graph: whether the decode step was replayed from a CUDA graph.
        settings: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed`` (the one drawn, when none was
            given, on the fast loop), ``stop`` and ``batch``.
    """

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    new_tokens: int
    seconds: float
    tokens_per_s: float
    engine: str
    cuda_graph: bool = False
    settings: dict = field(default_factory=dict)
    prefill_seconds: float | None = None
    decode_tokens_per_s: float | None = None


def check_settings(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop: Sequence[str] | None = None, engine: str = "auto") -> None:
    """Raise ValueError for settings that cannot be generated with (see :func:`generate`)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0 and top_p != 1:
        raise ValueError(f"top_p {top_p} applies to sampling only: give a temperature > 0 with it "
                         f"(temperature 0 is greedy decoding)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    for s in [stop] if isinstance(stop, str) else (stop or []):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def choose_engine(model, engine: str = "auto", max_len: int | None = None) -> str:
    """``"fast"`` or ``"hf"`` for ``model`` (see the module docstring) and sequences of up to ``max_len``
    positions (prompt + new tokens); a warning when ``auto`` falls back.

    Raises:
        ValueError: ``engine="fast"`` for an architecture (or a sliding window shorter than ``max_len``) the
            fast loop does not support.
    """
    from rankcut.bench.decode import check_supported

    if engine == "hf":
        return "hf"
    if engine == "fast":
        check_supported(model, max_len)
        return "fast"
    device = _device(model)
    try:
        check_supported(model, max_len)
        reason = None if device.type == "cuda" else f"the fast loop needs CUDA, the model is on {device}"
    except ValueError as err:
        reason = str(err)
    if reason:
        log.warning("generate: %s; using Hugging Face generate", reason)
        return "hf"
    return "fast"


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def tokenize_prompts(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """The token ids of each prompt, checked: none empty, each fitting the model's positions with
    ``max_new_tokens`` more (ValueError otherwise)."""
    limit = _max_positions(model)
    if tokenizer is None:
        raise ValueError("generate needs the model's tokenizer (tokenizer=...)")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompt given: prompts is empty")
    rows = []
    for i, text in enumerate(prompts, 1):
        if not isinstance(text, str) or not text:
            raise ValueError(f"prompt {i} is empty" if text == "" else f"prompt {i} is not a string: {text!r}")
        ids = tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} has no tokens")
        if limit is not None and len(ids) + max_new_tokens > limit:
            if len(ids) >= limit:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model takes at most {limit} positions")
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with max_new_tokens {max_new_tokens} that passes the "
                             f"model's {limit} positions; lower max_new_tokens to {limit - len(ids)} or less")
        rows.append(ids)
    return rows


class _Rows:
    """The host's view of each row: its tokens so far, whether and why it has finished, streaming."""

    def __init__(self, tokenizer, batch: int, eos: list[int], stop: list[str], stream) -> None:
        self.tok, self.eos, self.stop, self.stream = tokenizer, set(eos), stop, stream
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.reasons: list[str | None] = [None] * batch
        self.cut: list[str | None] = [None] * batch  # the final text of a row stopped by a stop string
        self.sent = [0] * batch  # characters streamed
        self.fed = 0  # tokens per row seen

    def text(self, b: int) -> str:
        if self.cut[b] is not None:
            return self.cut[b]
        ids = self.ids[b][:-1] if self.reasons[b] == "eos" else self.ids[b]
        return self.tok.decode(ids, skip_special_tokens=True)

    def update(self, chunk: list[list[int]]) -> bool:
        """Take the next tokens of every row; True once every row has finished."""
        self.fed += len(chunk[0]) if chunk else 0
        for b, new in enumerate(chunk):
            for token in new:
                if self.reasons[b] is not None:
                    break
                self.ids[b].append(token)
                if token in self.eos:
                    self._finish(b, "eos")
                elif self.stop:
                    text = self.text(b)
                    hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
                    if hits:
                        self.cut[b] = text[:min(hits)]
                        self._finish(b, "stop")
            if self.stream is not None and self.reasons[b] is None:
                self._emit(b, final=False)
        return all(r is not None for r in self.reasons)

    def close(self) -> None:
        for b, reason in enumerate(self.reasons):
            if reason is None:
                self._finish(b, "length")

    def _finish(self, b: int, reason: str) -> None:
        self.reasons[b] = reason
        if self.stream is not None:
            self._emit(b, final=True)

    def _emit(self, b: int, final: bool) -> None:
        """Stream the text that can no longer change: not a trailing partial character, nor a trailing piece
        that may begin a stop string."""
        text = self.text(b)
        end = len(text)
        if not final:
            end = len(text.rstrip("\ufffd"))
            held = [k for s in self.stop for k in range(1, min(len(s), end + 1)) if text[:end].endswith(s[:k])]
            end -= max(held, default=0)
        if end > self.sent[b]:
            self.stream(b, text[self.sent[b]:end])
            self.sent[b] = end


@torch.no_grad()
def _run_fast(model, rows: list[list[int]], pad_id: int, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, tracker: _Rows, use_graph: bool | None) -> tuple[float, bool, float, float]:
    """Returns wall seconds, whether a CUDA graph ran, prefill seconds and decode seconds."""
    from rankcut.bench.decode import make_decoder
    from rankcut.bench.loop import GenerationLoop
    from rankcut.bench.sampling import Sampler
    from rankcut.fuse import is_fused

    device = _device(model)
    length = max(len(r) for r in rows)
    prompt = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows], dtype=torch.long, device=device)
    pad = torch.tensor([length - len(r) for r in rows], dtype=torch.long, device=device)
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    if use_graph and device.type != "cuda":
        raise ValueError(f"use_graph needs a CUDA device, the model is on {device}")
    # a model fused for inference already (rankcut.load(fuse=True)) computes its groups itself: fusing again
    # would keep a second copy of those weights
    decoder = make_decoder(model, len(rows), length + max_new_tokens, fuse=not is_fused(model))
    try:
        sampler = Sampler(temperature, top_p, seed, len(rows), device)
        loop = GenerationLoop(decoder, prompt, pad, max_new_tokens, sampler, use_graph)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loop.run(tracker.update, 1 if tracker.stream is not None else CHECK_EVERY)
        return time.perf_counter() - start, loop.graph is not None, loop.prefill_s, loop.decode_s
    finally:
        decoder.release()  # the layers get their own storage back (save_pretrained refuses shared tensors)


class _Criteria(transformers.StoppingCriteria):
    """Hugging Face stopping criteria that feed each new token to the host's rows (stop strings, streaming)."""

    def __init__(self, tracker: _Rows) -> None:
        self.tracker = tracker

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        self.tracker.update([[t] for t in input_ids[:, -1].tolist()])
        return torch.tensor([r is not None for r in self.tracker.reasons], device=input_ids.device)


@torch.no_grad()
def _run_hf(model, rows: list[list[int]], pad_id: int, eos: list[int], max_new_tokens: int, temperature: float,
            top_p: float, seed: int | None, tracker: _Rows) -> float:
    if not hasattr(model, "generate"):
        raise ValueError(f"{type(model).__name__} has no generate method: not a Hugging Face causal LM")
    device = _device(model)
    length = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad_id,
                  stopping_criteria=transformers.StoppingCriteriaList([_Criteria(tracker)]))
    if eos:
        kwargs["eos_token_id"] = eos
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    devices = [device] if device.type == "cuda" else []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    seconds = time.perf_counter() - start
    rest = out[:, length + tracker.fed:].tolist()
    if rest and rest[0]:
        tracker.update(rest)
    return seconds


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, stop: str | Sequence[str] | None = None, seed: int | None = None,
             stream: Callable[[int, str], None] | None = None, engine: str = "auto",
             eos_token_id: int | Sequence[int] | None = None, use_graph: bool | None = None) -> GenerationResult:
    """Generate a continuation of each prompt, all prompts in one batch.

    Args:
        model: a Hugging Face causal LM (dense, or compressed and loaded by :func:`rankcut.load`), on the
            device to generate on.
        tokenizer: its tokenizer.
        prompts: one prompt or several (of any lengths).
        max_new_tokens: tokens to generate at most per prompt (>= 1).
        temperature: 0 for greedy decoding, > 0 to sample from ``softmax(logits / temperature)``.
        top_p: sample from the smallest set of most likely tokens whose probability reaches ``top_p`` (0, 1];
            only with ``temperature > 0``.
        stop: stop strings: a row stops once its text contains one, and its text is cut before it.
        seed: the sampling seed: the same seed gives the same tokens (on the same engine and batch). None draws
            a seed from torch's generator. Accepted and unused with greedy decoding.
        stream: called as ``stream(row, text)`` with each piece of a row's text as soon as it is final.
        engine: ``"auto"`` (the fast loop on CUDA for the Llama family and GPT-2, else Hugging Face, with a
            warning), ``"fast"`` (the fast loop anywhere; eager on the CPU) or ``"hf"``.
        eos_token_id: end-of-sequence token(s); default the model's generation config, else the tokenizer's.
        use_graph: fast loop only: replay a CUDA graph (default: on CUDA).

    Returns:
        A :class:`GenerationResult`.

    Raises:
        ValueError: an empty prompt or prompt list, no tokenizer, a prompt that with ``max_new_tokens`` passes
            the model's maximum positions, ``max_new_tokens < 1``, a negative temperature, ``top_p`` outside
            (0, 1] or given with greedy decoding, a negative seed, an empty stop string, an unknown engine or
            ``engine="fast"`` for an architecture it does not support.
    """
    check_settings(max_new_tokens, temperature, top_p, seed, stop, engine)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    rows = tokenize_prompts(model, tokenizer, prompts, max_new_tokens)
    chosen = choose_engine(model, engine, max(len(r) for r in rows) + max_new_tokens)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    tracker = _Rows(tokenizer, len(rows), eos, stop, stream)
    graph, prefill_s, decode_s = False, None, None
    if chosen == "fast":
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        seconds, graph, prefill_s, decode_s = _run_fast(model, rows, pad_id, max_new_tokens, temperature, top_p, seed,
                                                        tracker, use_graph)
    else:
        seconds = _run_hf(model, rows, pad_id, eos, max_new_tokens, temperature, top_p, seed, tracker)
    tracker.close()
    new = sum(len(ids) for ids in tracker.ids)
    after_first = new - sum(1 for ids in tracker.ids if ids)
    decode_rate = after_first / decode_s if decode_s and after_first else None
    return GenerationResult(
        texts=[tracker.text(b) for b in range(len(rows))], token_ids=tracker.ids, finish_reasons=tracker.reasons,
        new_tokens=new, seconds=seconds, tokens_per_s=new / seconds if seconds > 0 else float("inf"), engine=chosen,
        cuda_graph=graph, settings={"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                    "seed": seed, "stop": stop, "batch": len(rows)},
        prefill_seconds=prefill_s, decode_tokens_per_s=decode_rate)


def format_summary(result: GenerationResult) -> str:
    """The line ``rankcut generate`` prints at the end: tokens, time, tokens/s and which loop ran."""
    if result.engine == "fast":
        how = "rankcut fast loop, " + ("CUDA graph" if result.cuda_graph else "eager")
    else:
        how = "Hugging Face generate"
    reasons = ", ".join(f"{r} {result.finish_reasons.count(r)}" for r in ("eos", "stop", "length")
                        if r in result.finish_reasons)
    split = ""
    if result.decode_tokens_per_s is not None:
        split = f"; prefill {result.prefill_seconds * 1e3:.1f} ms, then decoding {result.decode_tokens_per_s:.1f} tokens/s"
    return (f"{result.new_tokens} new tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
            f"({how}; batch {len(result.texts)}; finished: {reasons}{split})")
