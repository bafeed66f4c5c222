"""Fused inference for any loaded model: layers that read the same input run as one product.

:func:`prepare_for_inference` applies the horizontal grouping the decode benchmark uses (q/k/v and gate/up of
each block, dense or low-rank alike; :mod:`rankcut.kernels.grouped`) to the model's own forward pass, so that
Hugging Face ``forward``/``generate`` get it too: the first layer of a group computes the whole group's
output once, and each layer returns its slice. Nothing about the model's structure changes (same modules,
same state-dict keys and values): the layers' ``forward`` is redirected, and their parameters become views of
the fused buffers. :func:`unfuse` undoes it exactly. While gradients are enabled for a layer's inputs or
parameters (training), the layers compute as before, so training a fused model is correct, just not fused.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Sibling projections that read one input: (parent, child) name patterns, in call order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))
_ATTR = "_rankcut_fused"


class _FusedCall:
    """Replaces ``layer.forward``: the group's output for this input, sliced to the layer's part."""

    def __init__(self, layer: nn.Module, group: nn.Module, index: int, state: dict) -> None:
        self.layer, self.group, self.index, self.state = layer, group, index, state
        self.segment = group.segments()[index] if hasattr(group, "segments") else _segments(group)[index]
        self.last = index == len(group.layers) - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.layer.parameters())):
            return type(self.layer).forward(self.layer, x)
        cached = self.state.get("input")
        if cached is not None and cached[0] is x and cached[1] == x._version:
            out = self.state["output"]
        else:
            out = self.group(x)
            self.state.update(input=(x, x._version), output=out)
        if self.last:
            self.state.clear()  # do not keep the activations alive between forward passes
        return out[..., self.segment]


def _segments(group) -> list[slice]:
    out, start = [], 0
    for n in group.ns:
        out.append(slice(start, start + n))
        start += n
    return out


def _candidates(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """``(parent name, [layers])`` for every group of sibling projections that exist together."""
    found = []
    for name, module in model.named_modules():
        for children in GROUPS:
            layers = [getattr(module, c, None) for c in children]
            if all(isinstance(layer, nn.Module) for layer in layers):
                found.append((name, layers))
    return found


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, _ATTR, None))


@torch.no_grad()
def prepare_for_inference(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up (and BERT's query/key/value) of every block of ``model`` in place.

    Groups are formed where every member is low-rank (``LowRankGroup``) or every member is a plain
    ``nn.Linear`` (``DenseGroup``) with one input width; mixed groups stay as they are. Idempotent.

    Returns:
        The number of groups fused.
    """
    from rankcut.modules.grouped import DenseGroup, LowRankGroup, QuantLowRankGroup, make_group

    if is_fused(model):
        return len(getattr(model, _ATTR))
    groups = []
    for parent, layers in _candidates(model):
        widths = {getattr(layer, "in_features", None) for layer in layers}
        if len(widths) != 1 or None in widths:
            continue
        group = make_group(layers)
        if not isinstance(group, (LowRankGroup, DenseGroup, QuantLowRankGroup)):
            continue
        state: dict = {}
        for index, layer in enumerate(layers):
            layer.forward = _FusedCall(layer, group, index, state)
        groups.append((parent, group))
    setattr(model, _ATTR, groups)
    log.info("fused %d groups of projections for inference", len(groups))
    return len(groups)


def unfuse(model: nn.Module) -> None:
    """Undo :func:`prepare_for_inference`: every layer gets its own forward and its own parameter storage back
    (before training or saving with other tools; :func:`rankcut.save` copies shared storage itself)."""
    for _, group in getattr(model, _ATTR, None) or []:
        group.unshare()
        for layer in group.layers:
            if isinstance(layer.__dict__.get("forward"), _FusedCall):
                del layer.forward
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)

