"""GPU kernels for low-rank inference, and their dispatch.

Triton is optional: nothing here imports it until a CUDA tensor reaches a kernel, so ``import rankcut``
works on machines without Triton or a GPU (the eager path is used there).

- :func:`lowrank_forward` / ``LowRankLinear.forward``: ``(x Vᵀ) Uᵀ + b`` at M ≤ 16 in two Triton launches
  where that measured faster than cuBLAS (:func:`~rankcut.kernels.plan.kernel_pays`).
- :class:`LowRankGroup` / :class:`DenseGroup` / :func:`make_group`: horizontal fusion of layers that share
  an input (q/k/v, gate/up), applied at inference time only.
- :func:`plan_lowrank`: the tile plan (pure Python); :func:`set_enabled`: switch the kernels off.
"""

from rankcut.kernels.dispatch import eligible, enabled, lowrank_forward, plan_overrides, set_enabled, triton_available
from rankcut.kernels.grouped import DenseGroup, LowRankGroup, SeparateGroup, make_group
from rankcut.kernels.plan import MAX_M, LowRankPlan, plan_lowrank, tile_table

__all__ = [
    "MAX_M",
    "DenseGroup",
    "LowRankGroup",
    "LowRankPlan",
    "SeparateGroup",
    "eligible",
    "enabled",
    "lowrank_forward",
    "make_group",
    "plan_lowrank",
    "plan_overrides",
    "set_enabled",
    "tile_table",
    "triton_available",
]
