"""Decomposition methods: a registry, one file per method, each with its own validated config dataclass.

Two kinds of method share one interface (``MethodSpec.decompose(items, config, rank, seed) -> Candidate``,
with ``items`` the targets of one :class:`~rankcut.units.Unit` and ``rank`` the largest rank the plan may
choose for it):

- **spectral** methods (``svd``, ``asvd``, ``whiten``), registered with :func:`register` on a pure function
  ``fn(W, stat, **options) -> Preconditioned``: a matrix ``A = W·M`` whose truncated SVD is taken, and a map
  ``unapply`` that brings the right factor back to the input space of ``W``. Truncating ``A = U S Vh`` to
  rank r gives ``W ≈ (U √S) · unapply(√S Vh)``. Their config is a :class:`SpectralConfig` subclass (solver
  settings plus the method's own options, which are exactly the function's keyword arguments).
- **group** methods, registered with :func:`register_group` on ``fn(items, config, rank, seed) ->
  Candidate``, and a ``units(targets, config)`` function that says which targets are decomposed jointly
  (e.g. the same tensor type of G layers). The pipeline hands them all the items of a unit at once.

Adding a method means adding one file that registers itself here.
"""

from rankcut.methods.base import (  # noqa: F401
    Item,
    MethodConfig,
    MethodSpec,
    Preconditioned,
    SpectralConfig,
    _REGISTRY,
    available_methods,
    get_method,
    per_target_units,
    register,
    register_group,
    unregister,
)
import rankcut.methods.asvd  # noqa: E402,F401  (importing the method modules registers them)
import rankcut.methods.svd  # noqa: E402,F401
import rankcut.methods.whiten  # noqa: E402,F401
import rankcut.methods.tucker  # noqa: E402,F401

__all__ = [
    "Item",
    "MethodConfig",
    "MethodSpec",
    "Preconditioned",
    "SpectralConfig",
    "available_methods",
    "get_method",
    "per_target_units",
    "register",
    "register_group",
    "unregister",
]
