"""Runtime modules rankcut swaps into a model, and the registry of module types.

A **module type** is how a decomposed target is rebuilt at load time. Each type registers a class with:

- ``record_type``: the name stored in the checkpoint record (``"lowrank"``);
- ``record_entry(self) -> dict``: what the record keeps for a built module (``type`` is added here);
- ``from_record(entry, dense, device) -> nn.Module`` (classmethod): an empty module of the recorded
  structure, built in place of the dense layer ``dense`` (a skeleton on the meta device at load time),
  whose tensors the checkpoint then fills.

:func:`rankcut.io.load` rebuilds every target through :func:`module_type`, so a new module type (shared
bases, quantized factors, runtime activation decomposition) is one file that calls :func:`register_module_type`
and needs no change to ``io``.
"""

from __future__ import annotations

from torch import nn

from rankcut.modules.dense import Conv1D, dense_shape, dense_weight, is_dense_linear
from rankcut.modules.lowrank import LowRankLinear
from rankcut.modules.shared import SharedBasisLinear, TuckerLinear
from rankcut.modules.quantized import QuantFactor, QuantLowRankLinear
from rankcut.modules.registry import (
    is_rankcut_module,
    module_type,
    module_types,
    rankcut_modules,
    record_entry,
    register_module_type,
)


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every :class:`LowRankLinear` of ``model`` by qualified name, in module order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}


__all__ = [
    "Conv1D",
    "LowRankLinear",
    "QuantFactor",
    "QuantLowRankLinear",
    "SharedBasisLinear",
    "TuckerLinear",
    "dense_shape",
    "dense_weight",
    "is_dense_linear",
    "is_rankcut_module",
    "low_rank_modules",
    "module_type",
    "module_types",
    "rankcut_modules",
    "record_entry",
    "register_module_type",
]
