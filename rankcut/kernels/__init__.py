"""GPU kernels for low-rank inference, and their dispatch.

Triton is optional: nothing here imports it until a CUDA tensor reaches a kernel, so ``import rankcut``
works on machines without Triton or a GPU (the eager path is used there).

- :func:`lowrank_forward` / ``LowRankLinear.forward``: ``(x Vᵀ) Uᵀ + b`` at M ≤ 16 in two Triton launches
  where that measured faster than cuBLAS (:func:`~rankcut.kernels.plan.kernel_pays`).
- The modules that use them for horizontal fusion of layers sharing an input (q/k/v, gate/up) are in
  :mod:`rankcut.modules.grouped`; :func:`rankcut.prepare_for_inference` applies them to a loaded model.
- :func:`plan_lowrank`: the tile plan (pure Python); :func:`set_enabled`: switch the kernels off.
"""

from rankcut.kernels.dispatch import eligible, enabled, lowrank_forward, plan_overrides, set_enabled, triton_available
from rankcut.kernels.plan import MAX_M, LowRankPlan, plan_lowrank, tile_table

__all__ = [
    "MAX_M",
    "LowRankPlan",
    "eligible",
    "enabled",
    "lowrank_forward",
    "plan_lowrank",
    "plan_overrides",
    "set_enabled",
    "tile_table",
    "triton_available",
]
