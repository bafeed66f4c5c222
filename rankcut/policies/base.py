"""The policy registry and base classes (documented in :mod:`rankcut.policies`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rankcut.units import Candidate, Decision, Unit

_REGISTRY: dict[str, type] = {}


class Policy:
    """Base class. Subclasses set ``name``, ``is_global``, optionally ``options_cls`` (a dataclass of the
    policy's own settings, ``CompressConfig.policy_options``) and implement :meth:`bound` and :meth:`choose` or
    :meth:`plan`."""

    name: ClassVar[str] = ""
    is_global: ClassVar[bool] = False
    options_cls: ClassVar[type | None] = None

    def __init__(self, config, context: dict | None = None) -> None:
        self.config, self.context = config, context or {}
        self.options = self.options_cls(**config.policy_options) if self.options_cls else None

    @classmethod
    def check_config(cls, config) -> None:
        """Validate (and default) the parameters of ``config`` the policy reads; raise ValueError otherwise."""

    @classmethod
    def make_options(cls, options) -> dict:
        """``options`` validated by :attr:`options_cls` (an unknown option is an error), as a plain dict."""
        options = dict(options or {})
        if cls.options_cls is None:
            if options:
                raise ValueError(f"allocation {cls.name!r} takes no options, got {sorted(options)}")
            return {}
        names = {f.name for f in dataclasses.fields(cls.options_cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"allocation {cls.name!r} has no option(s) {', '.join(unknown)} "
                             f"(its options: {', '.join(sorted(names))})")
        return dataclasses.asdict(cls.options_cls(**options))

    def check_targets(self, names: list[str]) -> None:
        """Called once with every target's name before anything is decomposed (a plan for other targets fails
        here, before any work)."""

    def bound(self, unit: Unit) -> int | Decision:
        """The largest rank this policy may choose for ``unit`` (decompose that far), or a decision already."""
        if unit.limit < 1:
            return Decision(None, f"break-even rank {unit.break_even:.2f} < 1: kept dense")
        return unit.limit

    def choose(self, unit: Unit, candidate: Candidate) -> Decision:
        """Local policies: the rank of ``unit`` from its own candidate."""
        raise NotImplementedError(f"policy {self.name!r} is global: it plans all units at once")

    def plan(self, candidates: dict[Unit, Candidate], fixed: dict[Unit, Decision]) -> dict[Unit, Decision]:
        """Global policies: a decision for every unit of ``candidates``; ``fixed`` are units decided otherwise
        (overrides, dense), whose parameters count against a budget."""
        return {unit: self.choose(unit, cand) for unit, cand in candidates.items()}


def register_policy(cls: type) -> type:
    """Class decorator registering a :class:`Policy` subclass under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"policy name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_policy(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown allocation {name!r}; choose one of {', '.join(sorted(_REGISTRY))}") from None


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(config, context: dict | None = None) -> Policy:
    """The policy ``config`` asks for, wrapped by its overrides (if any)."""
    from rankcut.policies.overrides import Overrides

    policy = get_policy(config.allocation)(config, context)
    return Overrides(policy, config.overrides) if config.overrides else policy
