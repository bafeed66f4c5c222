"""The dense layers rankcut decomposes: ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored (in, out))."""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 family stores its projections as Conv1D with weight (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


def is_dense_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or bool(Conv1D) and isinstance(module, Conv1D)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` as an (out, in) matrix (a view, not a copy).

    Raises:
        TypeError: anything else (a decomposed layer included).
    """
    if isinstance(layer, nn.Linear):
        return layer.weight
    if Conv1D and isinstance(layer, Conv1D):
        return layer.weight.t()
    from rankcut.modules.registry import is_rankcut_module

    if is_rankcut_module(layer):
        raise TypeError(f"layer is already decomposed ({type(layer).__name__}); use its to_dense() for the product")
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(layer).__name__}")


def dense_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a dense linear layer, without materialising anything (works on the meta device)."""
    weight = dense_weight(layer)
    return int(weight.shape[0]), int(weight.shape[1])
