"""Choosing the next token on the device: greedy, or sampling with temperature and top-p from a seed.

Everything is tensor operations of fixed shape with no host synchronisation, so the choice can sit inside the
captured CUDA-graph step (:class:`rankcut.bench.loop.GenerationLoop`). Sampling draws by the Gumbel-max trick,
``argmax(logits / T + G)`` with ``G = -log(-log U)``, which is an exact draw from ``softmax(logits / T)``
(restricted to the top-p nucleus when ``top_p < 1``). The uniforms ``U`` are not drawn from a stateful
generator: they are a hash of (seed, row, step, token id), a counter-based generator computed with integer
tensor operations. So the same seed gives the same draws on the CPU and on a GPU, eagerly or replayed in a
CUDA graph, with no generator state to register with the graph.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply rounds) of int64 values in [0, 2³²).

    The multipliers are odd and below 2³¹, so every product stays below 2⁶³: no int64 overflow anywhere."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK
    return x ^ (x >> 15)


def uniforms(keys: torch.Tensor, step: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float32 (B, V): one per row key (B,), the step (1,) and token id ``vocab`` (V,).

    24 bits of the hash make a float32 exactly: ``(h + 0.5) / 2²⁴`` is never 0 or 1."""
    k = _mix((keys[:, None] + _mix(step.view(1, 1) & _MASK)) & _MASK)
    h = _mix(_mix(vocab[None, :] ^ k) ^ keys[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def top_p_filter(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """``x`` (B, V) logits with every token outside the nucleus set to -inf: the nucleus is the smallest set of
    most likely tokens whose probability reaches ``top_p`` (at least the most likely token)."""
    ordered, order = x.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    ordered = ordered.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(-1, order, ordered)


class Sampler:
    """The next token (B,) from logits (B, V) at a step (a (1,) long tensor on the device).

    Args:
        temperature: 0 for greedy (argmax; ``top_p`` and ``seed`` are unused), else the softmax temperature.
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        seed: the draws' seed (an int); the same seed, batch and step give the same draws.
        batch: rows; each row draws from its own stream.
        device: where the logits are.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, batch: int, device: torch.device) -> None:
        self.temperature, self.top_p = float(temperature), float(top_p)
        rows = torch.arange(batch, dtype=torch.long, device=device)
        self.keys = _mix((_mix(rows) + (int(seed) & _MASK)) & _MASK)
        self.vocab: torch.Tensor | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(dim=-1)
        if self.vocab is None or self.vocab.numel() != logits.shape[-1]:  # first call: eager, before any capture
            self.vocab = torch.arange(logits.shape[-1], dtype=torch.long, device=logits.device)
        x = logits.float() / self.temperature
        if self.top_p < 1:
            x = top_p_filter(x, self.top_p)
        gumbel = -torch.log(-torch.log(uniforms(self.keys, step, self.vocab)))
        return (x + gumbel).argmax(dim=-1)
