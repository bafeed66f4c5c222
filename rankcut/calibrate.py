"""Calibration statistics by forward hooks, and a block-by-block runner that bounds memory.

Statistics are accumulated per *input*, not per target: targets that read the same tensor (q/k/v, or
gate/up) are found on the first batch and share one accumulator, so XᵀX is built once for them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn


class StatAccumulator:
    """Running statistic of a layer input x (…, n): ``gram`` = Σ xᵀx (float64) or ``absmean`` = mean |x|."""

    def __init__(self, kind: str) -> None:
        if kind not in ("gram", "absmean"):
            raise ValueError(f"unknown statistic {kind!r}")
        self.kind = kind
        self.total: torch.Tensor | None = None
        self.count = 0
        self._symmetric = False

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain inf/NaN")
        part = x.mT @ x if self.kind == "gram" else x.abs().sum(0)
        self.total = part if self.total is None else self.total.add_(part)
        self.count += x.shape[0]
        self._symmetric = False

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no calibration data reached this layer")
        if self.kind == "gram":
            if not self._symmetric:  # BLAS need not return xᵀx bit-symmetric; make it so once per read
                self.total = (self.total + self.total.mT) / 2
                self._symmetric = True
            return self.total
        return self.total / self.count


class StatsCollector:
    """Hooks on a set of modules; one accumulator per distinct input tensor.

    Use as a context manager around the forward passes; afterwards ``stat(name)`` gives each module's
    statistic and ``groups`` lists the module names that shared an input.
    """

    def __init__(self, modules: dict[str, nn.Module], kind: str) -> None:
        self.modules, self.kind = modules, kind
        self.leader: dict[str, str] = {}  # module name -> name of the module whose accumulator it shares
        self.accumulators: dict[str, StatAccumulator] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.leader:  # first batch: discover which inputs are shared
                ref = self._seen.get(id(x))
                if ref is not None and ref[0]() is x:
                    self.leader[name] = ref[1]
                else:
                    self._seen[id(x)] = (weakref.ref(x), name)
                    self.leader[name] = name
                    self.accumulators[name] = StatAccumulator(self.kind)
            if self.leader[name] == name:
                self.accumulators[name].update(x)

        return hook

    def __enter__(self) -> StatsCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def stat(self, name: str) -> torch.Tensor:
        if name not in self.leader:
            raise RuntimeError(f"calibration never reached {name}: is it used in the forward pass?")
        return self.accumulators[self.leader[name]].value()

    @property
    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for name, lead in self.leader.items():
            out.setdefault(lead, []).append(name)
        return list(out.values())


class _StopForward(Exception):
    pass


def batches(windows: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    """Keyword inputs for a forward pass over full windows (no padding, no cache)."""
    kwargs = {"input_ids": ids}
    if getattr(model.config, "use_cache", None) is not None and not getattr(model.config, "is_encoder_decoder", False):
        kwargs["use_cache"] = False
    return kwargs


def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int, device) -> list:
    """Run the model up to its first block for every batch; return each batch's ``(args, kwargs)`` there."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches(windows, batch_size):
                try:
                    model(**model_inputs(model, ids.to(device)))
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the first transformer block was never called")
    finally:
        handle.remove()
    return captured


def block_output(output) -> torch.Tensor:
    """A block's hidden-state output, whether returned bare or as the first item of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with its hidden-state input replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def move_outside(model: nn.Module, prefix: str, device) -> None:
    """Move every parameter and buffer not under module ``prefix`` to ``device`` (in place)."""
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buf in list(module.named_buffers(recurse=False)):
            module._buffers[key] = buf.to(device)
