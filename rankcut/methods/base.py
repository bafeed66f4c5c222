"""The method registry and base classes (documented in :mod:`rankcut.methods`)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rankcut.linalg import SOLVERS
from rankcut.units import Candidate, TargetInfo, Unit


@dataclass
class Preconditioned:
    """``A = W · M`` for some invertible M; ``unapply(R)`` returns ``R · M⁻¹``."""

    A: torch.Tensor
    unapply: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Item:
    """One target handed to a method: its info, its (out, in) weight on the work device, and its calibration
    statistic (or None)."""

    target: TargetInfo
    W: torch.Tensor
    stat: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's settings. Subclasses are frozen dataclasses whose fields carry a ``help``."""

    @classmethod
    def build(cls, value, method: str) -> MethodConfig:
        """``value`` (None, a dict, or an instance) as a validated instance of ``cls``.

        Raises:
            ValueError: an option ``method`` does not have (naming the ones it has), or a bad value.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, MethodConfig):
            raise ValueError(f"method {method!r} takes {cls.__name__}, got {type(value).__name__}")
        if not isinstance(value, dict):
            raise ValueError(f"options for method {method!r} must be a dict or {cls.__name__}, got {value!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            have = ", ".join(names) if names else "none"
            raise ValueError(f"method {method!r} has no option(s) {', '.join(unknown)} (its options: {have})")
        return cls(**value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SpectralConfig(MethodConfig):
    """Settings of the truncated SVD every spectral method takes."""

    solver: str = field(default="exact", metadata={"help": f"SVD solver: {', '.join(SOLVERS)}"})
    oversample: int = field(default=16, metadata={"help": "randomized SVD: extra sketch columns"})
    power_iters: int = field(default=2, metadata={"help": "randomized SVD: power iterations"})
    svd_dtype: str = field(default="float32", metadata={"help": "precision of the SVD itself (float32 or float64)"})

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.svd_dtype not in ("float32", "float64"):
            raise ValueError(f"svd_dtype must be one of float32, float64, got {self.svd_dtype!r}")
        _int_at_least("oversample", self.oversample, 0)
        _int_at_least("power_iters", self.power_iters, 0)

    def own(self) -> dict:
        """The method's own options (the keyword arguments of its function), without the solver settings."""
        base = {f.name for f in dataclasses.fields(SpectralConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry key.
        stat: the calibration statistic it consumes (``"gram"`` = XᵀX in float64, ``"absmean"`` = mean |x| per
            input channel) or None for data-free methods.
        config_cls: its settings dataclass.
        decompose: ``(items, config, rank, seed) -> Candidate`` for one unit; ``rank`` is the largest rank the
            plan may choose for the unit (decompose at least that far).
        units: ``(targets, config) -> [Unit]``: how targets group into units (one each for per-target methods).
        precondition: spectral methods only: ``(W, stat, config) -> Preconditioned``.
        reference: the paper.
        fn: the registered function.
    """

    name: str
    stat: str | None
    config_cls: type
    decompose: Callable[..., Candidate]
    units: Callable[..., list[Unit]]
    precondition: Callable[..., Preconditioned] | None = None
    reference: str = ""
    fn: Callable | None = None  # the registered function itself

    def make_config(self, value) -> MethodConfig:
        return self.config_cls.build(value, self.name)

    def option_names(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.config_cls)}


_REGISTRY: dict[str, MethodSpec] = {}


def per_target_units(targets: list[TargetInfo], config: MethodConfig | None = None) -> list[Unit]:
    """One unit per target, in order."""
    return [Unit((t,)) for t in targets]


def _add(spec: MethodSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def register(name: str, stat: str | None = None, reference: str = "", config: type = SpectralConfig) -> Callable:
    """Decorator registering a spectral method ``fn(W, stat, **options) -> Preconditioned`` under ``name``.

    ``config`` is a :class:`SpectralConfig` subclass whose own fields are exactly ``fn``'s keyword options.

    Raises:
        ValueError: the name is taken, or the config's fields and the function's options differ.
    """
    if not (isinstance(config, type) and issubclass(config, SpectralConfig)):
        raise ValueError(f"method {name!r}: config must be a SpectralConfig subclass")

    def wrap(fn: Callable[..., Preconditioned]) -> Callable[..., Preconditioned]:
        params = list(inspect.signature(fn).parameters)[2:]
        own = [f.name for f in dataclasses.fields(config) if f.name not in {g.name for g in dataclasses.fields(SpectralConfig)}]
        if sorted(params) != sorted(own):
            raise ValueError(f"method {name!r}: options of {fn.__name__} ({params}) differ from {config.__name__} ({own})")
        from rankcut.methods.spectral import decompose_spectral

        def precondition(W: torch.Tensor, stat, cfg: SpectralConfig) -> Preconditioned:
            return fn(W, stat, **cfg.own())

        def decompose(items, cfg, rank, seed=0):
            return decompose_spectral(precondition, items, cfg, rank, seed)

        _add(MethodSpec(name, stat, config, decompose, per_target_units, precondition, reference, fn))
        return fn

    return wrap


def register_group(name: str, stat: str | None = None, reference: str = "", config: type = MethodConfig,
                   units: Callable[..., list[Unit]] = per_target_units) -> Callable:
    """Decorator registering a group method ``fn(items, config, rank, seed) -> Candidate`` under ``name``;
    ``units(targets, config)`` forms its units (several targets each, for a joint decomposition)."""

    def wrap(fn: Callable[..., Candidate]) -> Callable[..., Candidate]:
        _add(MethodSpec(name, stat, config, fn, units, None, reference, fn))
        return fn

    return wrap


def unregister(name: str) -> None:
    """Remove a method (tests register temporary ones)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
