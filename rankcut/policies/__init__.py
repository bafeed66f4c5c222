"""Allocation policies: how each unit's rank is chosen. A registry, one file per policy.

A policy sees units before anything is decomposed and candidates after:

- :meth:`Policy.bound` (before decomposition): the largest rank the policy could choose for a unit, so the
  method decomposes that far and no further; or an immediate :class:`~rankcut.units.Decision` (e.g. dense).
- **local** policies (``is_global = False``: ``uniform``, ``energy``, ``rank``) decide each unit from its own
  candidate in :meth:`Policy.choose`, so the pipeline swaps each unit as soon as it is decomposed (memory:
  one block).
- **global** policies (``is_global = True``) see every unit's candidate before any rank is fixed, in
  :meth:`Policy.plan`; the pipeline keeps each candidate compacted on the host (one set of factors) until
  then.

Per-pattern overrides (``CompressConfig.overrides``) wrap the configured policy (:mod:`rankcut.policies.
overrides`): an overridden unit follows its rule, the policy allocates the others (a global policy's budget
counts the overridden units' parameters). A new policy is one file that calls :func:`register_policy`.
"""

from rankcut.policies.base import (  # noqa: F401
    Policy,
    _REGISTRY,
    available_policies,
    get_policy,
    make_policy,
    register_policy,
)
import rankcut.policies.energy  # noqa: E402,F401  (importing the policy modules registers them)
import rankcut.policies.plan  # noqa: E402,F401
import rankcut.policies.rank  # noqa: E402,F401
import rankcut.policies.sensitivity  # noqa: E402,F401
import rankcut.policies.spectrum  # noqa: E402,F401
import rankcut.policies.uniform  # noqa: E402,F401

__all__ = [
    "Policy",
    "available_policies",
    "get_policy",
    "make_policy",
    "register_policy",
]
