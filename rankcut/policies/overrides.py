"""Per-pattern overrides (like PEFT's ``rank_pattern``): the first matching pattern's rule wins.

A rule is ``{"keep": X}``, ``{"energy": X}``, ``{"rank": N}`` or ``{"dense": True}``; an empty rule (``{"dense":
False}``) means the configured policy. :class:`Overrides` wraps the configured policy: an overridden unit
follows its rule (a local policy of its own), the policy decides the others.
"""

from __future__ import annotations

from rankcut.config import pattern_matches
from rankcut.policies.base import Policy
from rankcut.policies.energy import Energy
from rankcut.policies.rank import FixedRank
from rankcut.policies.uniform import Uniform
from rankcut.units import Candidate, Decision, Unit


def rule_for(name: str, overrides: dict[str, dict]) -> dict | None:
    """The rule of the first pattern matching ``name`` (None: no override applies)."""
    for pattern, spec in overrides.items():
        if pattern_matches(pattern, name):
            rule = {k: v for k, v in spec.items() if v is not None and v is not False}
            return rule or None
    return None


class _Dense(Policy):
    name = "dense"

    def __init__(self) -> None:
        self.config, self.context, self.options = None, {}, None

    def bound(self, unit: Unit) -> Decision:
        return Decision(None, "dense by override")


def rule_policy(rule: dict) -> Policy:
    """The local policy of one override rule."""
    if rule.get("dense"):
        return _Dense()
    if "keep" in rule:
        return Uniform(keep=rule["keep"])
    if "rank" in rule:
        return FixedRank(rank=rule["rank"])
    return Energy(energy=rule["energy"])


class Overrides(Policy):
    """The configured policy with per-pattern rules in front of it."""

    def __init__(self, base: Policy, overrides: dict[str, dict]) -> None:
        self.base, self.overrides = base, overrides
        self.config, self.context, self.options = base.config, base.context, base.options
        self.is_global = base.is_global

    def _rule(self, unit: Unit) -> Policy | None:
        rules = [rule_for(name, self.overrides) for name in unit.names]
        if any(r != rules[0] for r in rules):
            raise ValueError(f"overrides give different rules to the targets of one group ({unit.name}): {rules}")
        return None if rules[0] is None else rule_policy(rules[0])

    def check_targets(self, names: list[str]) -> None:
        self.base.check_targets(names)

    def overridden(self, unit: Unit) -> bool:
        return self._rule(unit) is not None

    def bound(self, unit: Unit) -> int | Decision:
        return (self._rule(unit) or self.base).bound(unit)

    def choose(self, unit: Unit, candidate: Candidate) -> Decision:
        return (self._rule(unit) or self.base).choose(unit, candidate)

    def plan(self, candidates: dict[Unit, Candidate], fixed: dict[Unit, Decision]) -> dict[Unit, Decision]:
        mine = {u: self._rule(u).choose(u, c) for u, c in candidates.items() if self._rule(u) is not None}
        rest = {u: c for u, c in candidates.items() if u not in mine}
        return {**mine, **self.base.plan(rest, {**fixed, **mine})}


def allocation_for(name: str, config) -> dict:
    """The rule for target ``name``: its first matching override, else the configured global parameter
    (``{"keep": 0.8}``)."""
    return rule_for(name, config.overrides) or config.rule
