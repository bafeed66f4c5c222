"""Decomposition methods: a registry of pure functions.

A method turns a weight ``W`` (out×in) and, optionally, a calibration statistic into a
:class:`Preconditioned` problem: a matrix ``A`` whose truncated SVD is taken, and a map ``unapply`` that
brings the right factor back to the input space of ``W``. Truncating ``A = U S Vh`` to rank r then gives
``W ≈ (U √S) · unapply(√S Vh)``. Adding a method means adding one file that registers itself here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Preconditioned:
    """``A = W · M`` for some invertible M; ``unapply(R)`` returns ``R · M⁻¹``."""

    A: torch.Tensor
    unapply: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, the calibration statistic it needs (or None), its reference."""

    name: str
    fn: Callable[..., Preconditioned]
    stat: str | None
    reference: str


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, stat: str | None = None, reference: str = "") -> Callable:
    """Decorator registering ``fn(W, stat, **options) -> Preconditioned`` under ``name``.

    ``stat`` names the calibration statistic the method consumes: ``"gram"`` (XᵀX, float64), ``"absmean"``
    (mean |x| per input channel) or None for data-free methods.
    """

    def wrap(fn: Callable[..., Preconditioned]) -> Callable[..., Preconditioned]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, fn, stat, reference)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


# Importing the method modules registers them.
from rankcut.methods import asvd, svd, whiten  # noqa: E402,F401
