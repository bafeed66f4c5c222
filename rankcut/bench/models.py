"""Models for speed measurements: named shapes with random weights, random low-rank swaps, byte counts.

Decode speed does not depend on weight values, so large shapes (Llama-2-7B, Llama-3-8B) are built directly
on the GPU with random weights from a ``transformers`` config; no download is needed. A *random* low-rank
swap (:func:`random_lowrank_`) replaces every target by a :class:`~rankcut.modules.LowRankLinear` at the
uniform-keep rank with random factors: the same shapes, bytes and speed as a real compression, none of
its quality (use it for speed only).
"""

from __future__ import annotations

import logging
import math

import torch
import transformers
from torch import nn

from rankcut.units import uniform_rank
from rankcut.modules import LowRankLinear, dense_shape, low_rank_modules
from rankcut.targets import find_targets, get_submodule_parent

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "tiny-llama": dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False),
}
RANDOM_PREFIX = "random:"


def preset_config(name: str, layers: int | None = None) -> transformers.PretrainedConfig:
    """The ``transformers`` config of a named shape (``llama2-7b``, ``llama3-8b``, ``gpt2``, ``tiny-llama``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
    spec = dict(PRESETS[name])
    model_type = spec.pop("model_type")
    if layers is not None:
        spec["num_hidden_layers" if model_type != "gpt2" else "n_layer"] = layers
    return transformers.AutoConfig.for_model(model_type, **spec)


@torch.no_grad()
def random_model(config: transformers.PretrainedConfig, dtype: torch.dtype, device: str | torch.device,
                 seed: int = 0) -> transformers.PreTrainedModel:
    """A causal LM of ``config`` with N(0, 0.02²) weights created directly on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def random_lowrank_(model: nn.Module, keep: float, seed: int = 0) -> dict[str, int]:
    """Replace every default target of ``model`` by a random-factor :class:`LowRankLinear` at uniform keep.

    Each target gets ``r = floor(keep · mn/(m+n))`` (targets where that reaches break-even stay dense), with
    factors drawn N(0, 1/n) and N(0, 1/r), the dense layer's bias kept. For speed measurements only.

    Returns:
        The rank given to each target.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    gens: dict[torch.device, torch.Generator] = {}
    ranks = {}
    for name, module in find_targets(model).items():
        m, n = dense_shape(module)
        r = uniform_rank(m, n, keep)
        if r * (m + n) >= m * n:
            continue
        w = module.weight
        bias = getattr(module, "bias", None)
        layer = LowRankLinear(n, m, r, bias=bias is not None, device=w.device, dtype=w.dtype)
        gen = gens.setdefault(w.device, torch.Generator(device=w.device).manual_seed(seed))
        layer.V.weight.normal_(0, 1 / math.sqrt(n), generator=gen)  # drawn where the model lives: fast on a GPU
        layer.U.weight.normal_(0, 1 / math.sqrt(r), generator=gen)
        if bias is not None:
            layer.U.bias.copy_(bias.detach())
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, layer)
        ranks[name] = r
    log.info("random low-rank swap at keep %.3f: %d targets", keep, len(ranks))
    return ranks


def _unique_params(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        key = (p.data_ptr(), p.numel()) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters one decode step reads: every parameter once, except embedding tables (a step
    reads one row of each), unless a table is tied to the LM head (then the head reads all of it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ptr = head.weight.data_ptr() if head is not None else None
    tables = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for p in _unique_params(model):
        if p.data_ptr() in tables and p.data_ptr() != head_ptr:
            continue
        total += p.numel() * p.element_size()
    for module in model.modules():  # quantised factors: codes and scales are buffers
        if getattr(module, "keeps_dtype", False):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total


def target_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the default targets would have dense, bytes they have now) — low-rank layers count r(m+n)."""
    dense = now = 0
    for module in low_rank_modules(model).values():
        size = module.U.weight.element_size()
        dense += module.in_features * module.out_features * size
        now += module.rank * (module.in_features + module.out_features) * size
    try:
        for module in find_targets(model).values():
            w = module.weight
            dense += w.numel() * w.element_size()
            now += w.numel() * w.element_size()
    except ValueError:  # every target already low-rank
        pass
    return dense, now
