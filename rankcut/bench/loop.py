"""Decode loops: prefill, then one decode step captured once in a CUDA graph and replayed.

- :class:`DecodeLoop` (the benchmark, :func:`time_decode`): greedy decoding runs entirely on the device: the
  step writes its argmax into the static input buffer and advances the position tensor, so ``new_tokens``
  replays run back to back with no host synchronisation.
- :class:`GenerationLoop` (:func:`rankcut.bench.generate.generate`): a left-padded batch of prompts, the next
  token chosen on the device by a :class:`~rankcut.bench.sampling.Sampler` (greedy or seeded sampling). The
  host looks at the tokens only every ``check_every`` steps (every step when streaming) to decide whether every
  row has finished (end of sequence, a stop string); rows that finished early keep being computed until then,
  and their extra tokens are ignored.

Both run eagerly where CUDA graphs are unavailable (the CPU, or ``use_graph=False``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from rankcut.bench.decode import _Decoder
from rankcut.bench.sampling import Sampler
from rankcut.bench.timing import EnergyMeter


def capture(step: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """``step`` run ``warmup`` times eagerly on a side stream (Triton compilation, scratch allocation, cuBLAS
    handles), then captured once in a CUDA graph. The warm-up runs change the buffers ``step`` updates: reset
    them (a new prefill) before replaying."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def _advance(loop) -> None:
    """One decode step of ``loop``: its graph replayed, or its step run eagerly."""
    if loop.graph is not None:
        loop.graph.replay()
    else:
        loop.step()


class DecodeLoop:
    """Static buffers and the (captured) step for one decoder, batch, prompt and generation length."""

    def __init__(self, decoder: _Decoder, prompt: torch.Tensor, new_tokens: int, use_graph: bool) -> None:
        self.dec, self.prompt, self.new_tokens = decoder, prompt, new_tokens
        self.batch, self.prompt_len = prompt.shape
        dev = decoder.device
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(self.batch, new_tokens + 1, dtype=torch.long, device=dev)
        self.graph = None
        if use_graph:
            self._capture()

    def prefill(self) -> None:
        """Run the prompt through the model (filling the cache) and emit the first token."""
        self.pos.zero_()
        nxt = self.dec.forward(self.prompt, self.pos).argmax(-1)
        self.ids.copy_(nxt.view(self.batch, 1))
        self.tokens[:, 0] = nxt
        self.pos.fill_(self.prompt_len)

    def step(self) -> None:
        """One decode step on the static buffers (what the graph replays)."""
        nxt = self.dec.forward(self.ids, self.pos).argmax(-1).view(self.batch, 1)
        self.ids.copy_(nxt)
        self.tokens.index_copy_(1, self.pos - (self.prompt_len - 1), nxt)
        self.pos.add_(1)

    def _capture(self) -> None:
        self.prefill()
        self.graph = capture(self.step, warmup=min(2, self.new_tokens))

    def run_steps(self) -> None:
        """``new_tokens`` decode steps after a prefill (not timed here)."""
        for _ in range(self.new_tokens):
            _advance(self)


class GenerationLoop:
    """Static buffers and the (captured) step for one batch and generation length.

    Args:
        decoder: from :func:`~rankcut.bench.decode.make_decoder`, for ``batch`` rows and at least
            ``prompt.shape[1] + max_new_tokens`` cache slots.
        prompt: (B, L) token ids, each row left-padded to L.
        pad: (B,) the number of padding slots of each row.
        max_new_tokens: tokens to generate at most (the first comes from the prefill).
        sampler: the device-side choice of the next token.
        use_graph: capture the step in a CUDA graph (captured here, after a throwaway prefill and warm-up).
    """

    def __init__(self, decoder: _Decoder, prompt: torch.Tensor, pad: torch.Tensor, max_new_tokens: int,
                 sampler: Sampler, use_graph: bool) -> None:
        self.dec, self.prompt, self.pad, self.sampler = decoder, prompt, pad, sampler
        self.batch, self.prompt_len = prompt.shape
        self.max_new_tokens = max_new_tokens
        dev = decoder.device
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(self.batch, max_new_tokens, dtype=torch.long, device=dev)
        self.graph = None
        if use_graph and max_new_tokens > 1:
            self.prefill()
            self.graph = capture(self.step, warmup=min(2, max_new_tokens - 1))

    def prefill(self) -> None:
        """Run the prompts through the model (filling the cache) and choose the first token."""
        self.pos.zero_()
        nxt = self.sampler(self.dec.forward(self.prompt, self.pos, self.pad), self.pos)
        self.ids.copy_(nxt.view(self.batch, 1))
        self.tokens[:, 0] = nxt
        self.pos.fill_(self.prompt_len)

    def step(self) -> None:
        """One decode step on the static buffers (what the graph replays)."""
        index = self.pos - (self.prompt_len - 1)  # of the token chosen now among the generated ones
        nxt = self.sampler(self.dec.forward(self.ids, self.pos, self.pad), index).view(self.batch, 1)
        self.ids.copy_(nxt)
        self.tokens.index_copy_(1, index, nxt)
        self.pos.add_(1)

    @torch.no_grad()
    def run(self, on_tokens: Callable[[list[list[int]]], bool], check_every: int = 16) -> int:
        """Prefill, then decode until ``on_tokens`` says every row has finished or ``max_new_tokens`` are made.

        ``on_tokens`` receives the tokens made since its last call, one list per row, at least every
        ``check_every`` tokens and after the last one; it returns True to stop. Returns the tokens made per row.

        On CUDA the host never lets the device wait for it: before it looks at tokens it queues the next step,
        and it reads the tokens through an asynchronous copy to pinned memory, so the device computes step
        ``k + 1`` while the host decodes and checks step ``k``'s text (a row that finished gets one more token,
        ignored). ``self.decode_s`` is then the device time from the first token to the last one reported
        (host waits included), ``self.prefill_s`` the time to the first token.
        """
        cuda = self.dec.device.type == "cuda"
        if cuda:
            host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
        else:
            start = time.perf_counter()
        self.prefill()
        if cuda:
            t1.record()
        else:
            after_prefill = time.perf_counter()
        made, seen = 1, 0  # tokens computed (or queued), tokens reported
        while True:
            if made == self.max_new_tokens or made - seen >= check_every:
                upto = made
                if cuda:
                    host[:, seen:upto].copy_(self.tokens[:, seen:upto], non_blocking=True)
                    ready = torch.cuda.Event(enable_timing=True)
                    ready.record()
                    if made < self.max_new_tokens:  # keep the device busy while the host looks
                        _advance(self)
                        made += 1
                    ready.synchronize()
                    chunk = host[:, seen:upto].tolist()
                else:
                    chunk = self.tokens[:, seen:upto].tolist()
                finished = on_tokens(chunk)
                seen = upto
                if finished or seen == self.max_new_tokens:
                    if cuda:
                        self.prefill_s, self.decode_s = t0.elapsed_time(t1) / 1e3, t1.elapsed_time(ready) / 1e3
                    else:
                        self.prefill_s, self.decode_s = after_prefill - start, time.perf_counter() - after_prefill
                    return seen
                continue
            _advance(self)
            made += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(decoder: _Decoder, prompt: torch.Tensor, new_tokens: int, repeats: int = 3,
                use_graph: bool | None = None, progress: bool = False) -> dict:
    """Prefill ``prompt`` and decode ``new_tokens`` greedily, ``repeats`` times; time each part.

    Returns:
        ``ms_per_token`` (median over repeats), ``tokens_per_s`` (batch × new_tokens / decode time),
        ``prefill_ms``, all repeats' decode times, peak memory, energy per token (NVML; None where
        unavailable), whether a CUDA graph was used, and the first generated tokens of sequence 0.
    """
    device = decoder.device
    cuda = device.type == "cuda"
    use_graph = cuda if use_graph is None else use_graph
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    loop = DecodeLoop(decoder, prompt, new_tokens, use_graph)
    meter = EnergyMeter(device)
    decode_s, prefill_s = [], []
    for _ in tqdm(range(repeats), desc="decode", disable=not progress):
        _sync(device)
        t0 = time.perf_counter()
        loop.prefill()
        _sync(device)
        t1 = time.perf_counter()
        with meter:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loop.run_steps()
                end.record()
                end.synchronize()
                decode_s.append(start.elapsed_time(end) / 1e3)
            else:
                loop.run_steps()
                decode_s.append(time.perf_counter() - t1)
        prefill_s.append(t1 - t0)
    batch = prompt.shape[0]
    med = statistics.median(decode_s)
    tokens = batch * new_tokens * repeats
    energy = meter.joules
    return {
        "ms_per_token": 1e3 * med / new_tokens,
        "tokens_per_s": batch * new_tokens / med,
        "decode_s": decode_s,
        "prefill_ms": 1e3 * statistics.median(prefill_s),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "energy_j_per_token": energy / tokens if energy is not None else None,
        "mean_power_w": energy / sum(decode_s) if energy is not None else None,
        "cuda_graph": loop.graph is not None,
        "first_tokens": loop.tokens[0, :16].tolist(),
    }
