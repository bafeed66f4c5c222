"""The quantisation phase: a compressed model's low-rank factors stored as int8, fp8 e4m3 or int4 (issue 14).

:func:`quantize_factors_` replaces every :class:`~rankcut.modules.LowRankLinear` by a
:class:`~rankcut.modules.QuantLowRankLinear`. With calibration windows and ``compensate`` (the default), a
statistics pass of the block pipeline (:func:`rankcut.pipeline.run_blocks`) measures each layer's input Gram
matrix ``XᵀX`` in the compressed model, and U is refitted to the quantised V in that norm — the layer's output
error on the calibration data — before U is quantised (:func:`rankcut.quant.refit_left`). Without windows the
refit is in the Frobenius norm. :func:`rankcut.compress_` runs this phase when ``CompressConfig.factor_dtype``
is set, on its own calibration windows.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from rankcut.modules import LowRankLinear, QuantLowRankLinear, rankcut_modules
from rankcut.pipeline import Visitor, run_blocks
from rankcut.quant import FORMATS, check_group
from rankcut.targets import find_blocks, replace_module
from rankcut.utils import resolve_device


def check_quantizable(model: nn.Module, fmt: str, group: int = 128) -> dict[str, LowRankLinear]:
    """The layers :func:`quantize_factors_` would quantise, after checking it can (nothing is changed).

    Raises:
        ValueError: an unknown format; no low-rank layers; a decomposed layer of another module type (shared
            bases, Tucker: their factors are not quantised); an int4 group that does not divide a layer's input
            dimension (naming the layer).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown factor dtype {fmt!r}; choose one of {', '.join(FORMATS)}")
    layers, other = {}, []
    for name, module in rankcut_modules(model).items():
        if type(module) is LowRankLinear:
            layers[name] = module
        elif not isinstance(module, QuantLowRankLinear):
            other.append(f"{name} ({module.record_type})")
    if other:
        raise ValueError(f"quantised factors are for low-rank layers; {other[0]} is not one "
                         f"({len(other)} such layer(s)): use method svd, asvd or whiten")
    if not layers:
        raise ValueError("the model holds no low-rank layers to quantise: compress it first")
    if fmt == "int4":
        for name, layer in layers.items():
            try:
                check_group(layer.in_features, group)
            except ValueError as err:
                raise ValueError(f"{name}: {err} (choose --factor-group dividing it)") from None
    return layers


class _Quantizer(Visitor):
    """Quantises each block's low-rank layers as their input Gram matrices arrive (hooked on their V)."""

    def __init__(self, model: nn.Module, fmt: str, group: int, compensate: bool, progress: bool) -> None:
        self.model, self.fmt, self.group, self.compensate, self.progress = model, fmt, group, compensate, progress
        self.stat = "gram" if compensate else None
        self.done: list[str] = []

    def visit(self, block, targets, stats) -> None:
        names = list(targets)
        for key in tqdm(names, desc="quantize", disable=not self.progress or block is not None):
            name = key.removesuffix(".V")
            layer = self.model.get_submodule(name)
            gram = None if stats is None else stats(key)
            q = QuantLowRankLinear.from_lowrank(layer, self.fmt, self.group, gram, self.compensate)
            replace_module(self.model, name, q)
            self.done.append(name)


def quantize_factors_(model: nn.Module, fmt: str, group: int = 128, windows: torch.Tensor | None = None,
                      compensate: bool = True, device: str | torch.device | None = None, batch_size: int = 8,
                      progress: bool = True) -> list[str]:
    """Store the factors of every low-rank layer of ``model`` as ``fmt`` (``int8``, ``fp8``, ``int4``), in place.

    Args:
        fmt: ``int8`` and ``fp8`` (e4m3) with one float32 scale per output channel of each factor; ``int4`` with
            one scale per ``group`` input columns.
        windows: (N, T) calibration token windows for the compensation's Gram matrices (None: Frobenius norm).
        compensate: refit U to the quantised V before quantising U (False: both quantised as they are).
        device: where the statistics pass runs (default CUDA when available).

    Returns:
        The names of the quantised layers. The record's entries are updated when the model carries one.

    Raises:
        ValueError: see :func:`check_quantizable` (raised before anything changes).
    """
    layers = check_quantizable(model, fmt, group)
    work = _Quantizer(model, fmt, group, compensate, progress)
    targets = {f"{name}.V": layer.V for name, layer in layers.items()}
    use_data = compensate and windows is not None
    run_blocks(model, targets, windows if use_data else None, work if use_data else _NoData(work),
               device=resolve_device(device, model), batch_size=batch_size,
               layerwise=find_blocks(model) is not None, progress=progress)
    _update_record(model)
    return work.done


class _NoData(Visitor):
    """The quantiser without statistics (refit in the Frobenius norm, or no refit)."""

    def __init__(self, inner: _Quantizer) -> None:
        self.inner = inner

    def visit(self, block, targets, stats) -> None:
        self.inner.visit(block, targets, None)


def _update_record(model: nn.Module) -> None:
    from rankcut.modules import record_entry
    from rankcut.record import get_record

    record = get_record(model)
    if record is not None:
        record.targets = {name: record_entry(module) for name, module in rankcut_modules(model).items()}
